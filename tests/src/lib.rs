//! End-to-end tests over the fixtures live in `tests/tests/`; shared helpers in `tests/tests/common/`.
