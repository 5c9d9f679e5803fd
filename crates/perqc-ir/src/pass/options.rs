//! The options a pipeline gives one pass.

use std::str::FromStr;

/// The options a pipeline gave one pass, for its factory to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassOptions {
    pass: String,
    options: Vec<(String, String)>,
}

/// A pass option the factory rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("pass `{pass}` has no option `{option}` (valid options: {valid})")]
    Unknown {
        pass: String,
        option: String,
        /// The valid names, comma-separated, or `none`.
        valid: String,
    },
    #[error("pass `{pass}` option `{option}`: `{value}` is not {expected}")]
    Invalid {
        pass: String,
        option: String,
        value: String,
        expected: String,
    },
}

impl PassOptions {
    pub fn new(pass: &str, options: Vec<(String, String)>) -> PassOptions {
        PassOptions {
            pass: pass.to_string(),
            options,
        }
    }

    /// No options.
    pub fn none(pass: &str) -> PassOptions {
        PassOptions::new(pass, Vec::new())
    }

    pub fn pass(&self) -> &str {
        &self.pass
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }

    /// Fails on the first option whose name is not in `valid`, listing the valid ones.
    /// Every factory calls this first.
    pub fn allow_only(&self, valid: &[&str]) -> Result<(), OptionError> {
        for (k, _) in &self.options {
            if !valid.contains(&k.as_str()) {
                return Err(OptionError::Unknown {
                    pass: self.pass.clone(),
                    option: k.clone(),
                    valid: if valid.is_empty() {
                        "none".to_string()
                    } else {
                        valid.join(", ")
                    },
                });
            }
        }
        Ok(())
    }

    /// The raw value of option `name`, if given (the last one if repeated).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn invalid(&self, name: &str, value: &str, expected: String) -> OptionError {
        OptionError::Invalid {
            pass: self.pass.clone(),
            option: name.to_string(),
            value: value.to_string(),
            expected,
        }
    }

    /// Option `name` parsed as `T` (`what` names the expected form in errors, e.g.
    /// "a non-negative integer"), or `default` if absent.
    pub fn parse_or<T: FromStr>(
        &self,
        name: &str,
        what: &str,
        default: T,
    ) -> Result<T, OptionError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| self.invalid(name, v, what.to_string())),
        }
    }

    /// A boolean option: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, OptionError> {
        match self.get(name) {
            None => Ok(default),
            Some("true" | "yes" | "on" | "1") => Ok(true),
            Some("false" | "no" | "off" | "0") => Ok(false),
            Some(v) => Err(self.invalid(name, v, "a boolean (true or false)".into())),
        }
    }

    /// One of `choices`, or `default` if absent.
    pub fn choice_or<'c>(
        &self,
        name: &str,
        choices: &[&'c str],
        default: &'c str,
    ) -> Result<&'c str, OptionError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => choices
                .iter()
                .copied()
                .find(|c| *c == v)
                .ok_or_else(|| self.invalid(name, v, format!("one of {}", choices.join(", ")))),
        }
    }
}
