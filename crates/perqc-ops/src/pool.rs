//! Reuse of large f32 buffers across runs, for what the system allocator does not keep.
//!
//! glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mappings
//! and unmaps them on free, so a buffer that size is page-faulted and zeroed by the kernel
//! on every run: SmolLM2's 100 MB logits cost about 50 ms of a 0.55 s forward in
//! `clear_page` alone, on huge pages. The pool keeps such buffers for the next kernel
//! output of the same size ([`output_vec`](crate::kernel::output_vec) asks it first).
//!
//! Process-wide and off by default, like the allocator tuning it complements: programs
//! that run sessions repeatedly turn it on (`perqc_runtime::tune_allocator`), and
//! buffers come back only through [`recycle`] (the runtime hands it the dead values of a
//! run; a caller may hand back the outputs it is done with). Invariants: every pooled
//! buffer is an empty `Vec<f32>` of at least [`MIN_BYTES`] capacity; the pool holds at
//! most [`MAX_KEPT`] of them; [`clear`] frees them all.

use crate::kernel::RtTensor;
use std::any::Any;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Buffers below this are left to the allocator (glibc's tuned heap reuses them).
pub const MIN_BYTES: usize = 32 << 20;
/// At most this many buffers are kept; a buffer recycled into a full pool is freed.
pub const MAX_KEPT: usize = 4;

static ENABLED: AtomicBool = AtomicBool::new(false);
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Turns reuse on or off; turning it off frees what the pool holds.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
    if !on {
        clear();
    }
}

/// Frees every pooled buffer.
pub fn clear() {
    let drained = std::mem::take(&mut *lock());
    drop(drained);
}

/// Gives `t`'s memory to the pool when reuse is on, `t` is f32, owns its buffer alone
/// (no other handle to it) and the buffer has at least [`MIN_BYTES`]; otherwise drops it.
pub fn recycle(t: RtTensor) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let RtTensor::F32(a) = t else { return };
    if a.len() * 4 < MIN_BYTES {
        return;
    }
    let Ok(owned) = a.try_into_owned_nocopy() else {
        return;
    };
    let (mut v, _) = owned.into_raw_vec_and_offset();
    v.clear();
    let mut pool = lock();
    if pool.len() < MAX_KEPT {
        pool.push(v);
    }
}

/// An empty `Vec<T>` with capacity for exactly `len` elements from the pool. Exact, because
/// kernels may treat the whole spare capacity as their output (as a fresh
/// `Vec::with_capacity(len)` has it), and a run repeated on the same shapes asks for the
/// same sizes. `None` when reuse is off, `T` is not f32, the request is below
/// [`MIN_BYTES`] or no buffer has that capacity.
pub(crate) fn take<T: 'static>(len: usize) -> Option<Vec<T>> {
    if !ENABLED.load(Ordering::Relaxed)
        || std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>()
        || len.saturating_mul(4) < MIN_BYTES
    {
        return None;
    }
    let v = {
        let mut pool = lock();
        let at = pool.iter().position(|v| v.capacity() == len)?;
        pool.swap_remove(at)
    };
    let any: Box<dyn Any> = Box::new(v);
    any.downcast::<Vec<T>>().ok().map(|b| *b)
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Vec<f32>>> {
    // A panic while holding the lock leaves only empty buffers behind: keep using them.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn big(len: usize) -> RtTensor {
        RtTensor::f32(ArrayD::from_shape_vec(IxDyn(&[len]), vec![1.0; len]).unwrap())
    }

    /// One test, since the pool is process-wide.
    #[test]
    fn reuses_unique_large_buffers_only_when_enabled() {
        let len = MIN_BYTES / 4 + 64;
        recycle(big(len));
        assert!(take::<f32>(len).is_none(), "off by default");

        enable(true);
        let t = big(len);
        let shared = t.clone();
        recycle(t);
        assert!(take::<f32>(len).is_none(), "a shared buffer is not taken");
        drop(shared);

        let t = big(len);
        let ptr2 = match &t {
            RtTensor::F32(a) => a.as_ptr(),
            _ => unreachable!(),
        };
        recycle(t);
        assert!(take::<i32>(len).is_none(), "only f32 requests");
        assert!(take::<f32>(len - 8).is_none(), "not for a smaller request");
        assert!(take::<f32>(len + 1).is_none(), "not for a larger one");
        let v = take::<f32>(len).expect("reused");
        assert_eq!((v.as_ptr(), v.len(), v.capacity()), (ptr2, 0, len));

        recycle(big(16));
        assert!(lock().is_empty(), "small buffers are left to the allocator");
        for _ in 0..MAX_KEPT + 2 {
            recycle(big(len));
        }
        assert_eq!(lock().len(), MAX_KEPT);
        enable(false);
        assert!(lock().is_empty());
    }
}
