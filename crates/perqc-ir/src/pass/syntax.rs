//! Pipeline syntax: `a,b(opt=1),c` into [`PassSpec`]s.

use super::*;
use std::fmt;

/// One pass of a pipeline string: its name, options, and 1-based columns in the string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassSpec {
    pub name: String,
    pub options: Vec<(String, String)>,
    /// Column of the name (0 for specs not parsed from a string).
    pub column: usize,
    /// Column of each option's name, parallel to `options`.
    pub option_columns: Vec<usize>,
}

impl PassSpec {
    pub fn new(name: &str) -> PassSpec {
        PassSpec {
            name: name.to_string(),
            options: Vec::new(),
            column: 0,
            option_columns: Vec::new(),
        }
    }

    /// The column of option `name`, else of the pass name.
    pub fn column_of(&self, option: &str) -> usize {
        self.options
            .iter()
            .zip(&self.option_columns)
            .find(|((k, _), _)| k == option)
            .map_or(self.column, |(_, &c)| c)
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn is_value_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, ',' | '(' | ')' | '=' | '"')
}

impl fmt::Display for PassSpec {
    /// The canonical spelling, `name` or `name(k=v,...)`, which parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.options.is_empty() {
            return Ok(());
        }
        f.write_str("(")?;
        for (i, (k, v)) in self.options.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if !v.is_empty() && v.chars().all(is_value_char) {
                write!(f, "{k}={v}")?;
            } else {
                write!(
                    f,
                    "{k}=\"{}\"",
                    v.replace('\\', "\\\\").replace('"', "\\\"")
                )?;
            }
        }
        f.write_str(")")
    }
}

/// Why a pipeline could not be parsed or built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline `{pipeline}`, column {column}: {message}")]
    Syntax {
        pipeline: String,
        column: usize,
        message: String,
    },
    #[error("pipeline `{pipeline}`, column {column}: unknown pass `{name}`{hint}")]
    UnknownPass {
        pipeline: String,
        column: usize,
        name: String,
        /// The closest registered name, if one is close.
        suggestion: Option<String>,
        /// `; did you mean ...?` or `; known passes: ...`.
        hint: String,
    },
    #[error("pipeline `{pipeline}`, column {column}: {source}")]
    Option {
        pipeline: String,
        column: usize,
        source: Box<OptionError>,
    },
    #[error("pass `{pass}` (#{index}) requires `{property}`, {reason}")]
    MissingProperty {
        pass: String,
        index: usize,
        property: Property,
        reason: String,
    },
}

impl PipelineError {
    /// The 1-based column the error points at, if it is about a place in the string.
    pub fn column(&self) -> Option<usize> {
        match self {
            PipelineError::Syntax { column, .. }
            | PipelineError::UnknownPass { column, .. }
            | PipelineError::Option { column, .. } => Some(*column),
            PipelineError::MissingProperty { .. } => None,
        }
    }

    /// Two lines for a terminal: the pipeline and a caret under the column.
    pub fn caret(&self) -> Option<String> {
        let (pipeline, column) = match self {
            PipelineError::Syntax {
                pipeline, column, ..
            }
            | PipelineError::UnknownPass {
                pipeline, column, ..
            }
            | PipelineError::Option {
                pipeline, column, ..
            } => (pipeline, *column),
            PipelineError::MissingProperty { .. } => return None,
        };
        Some(format!(
            "{pipeline}\n{}^",
            " ".repeat(column.saturating_sub(1))
        ))
    }
}

struct Cursor<'s> {
    src: &'s str,
    chars: Vec<char>,
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn column(&self) -> usize {
        self.pos + 1
    }

    fn error(&self, message: impl Into<String>) -> PipelineError {
        PipelineError::Syntax {
            pipeline: self.src.to_string(),
            column: self.column(),
            message: message.into(),
        }
    }

    fn found(&self) -> String {
        match self.peek() {
            Some(c) => format!("`{c}`"),
            None => "the end".to_string(),
        }
    }

    fn word(&mut self, what: &str) -> Result<String, PipelineError> {
        let start = self.pos;
        while self.peek().is_some_and(is_word_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error(format!("expected {what}, found {}", self.found())));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn value(&mut self) -> Result<String, PipelineError> {
        if self.peek() == Some('"') {
            let open = self.pos;
            self.pos += 1;
            let mut s = String::new();
            loop {
                match self.peek() {
                    None => {
                        self.pos = open;
                        return Err(self.error("unterminated quoted value"));
                    }
                    Some('"') => {
                        self.pos += 1;
                        return Ok(s);
                    }
                    Some('\\') if matches!(self.chars.get(self.pos + 1), Some('"' | '\\')) => {
                        s.push(self.chars[self.pos + 1]);
                        self.pos += 2;
                    }
                    Some(c) => {
                        s.push(c);
                        self.pos += 1;
                    }
                }
            }
        }
        let start = self.pos;
        while self.peek().is_some_and(is_value_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error(format!("expected an option value, found {}", self.found())));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }
}

/// Parses a pipeline string: `pass,pass(opt=value,flag),...`. Whitespace around tokens is
/// ignored; an empty string or `none` is the empty pipeline; an option without `=value`
/// means `=true`; values with spaces, commas or parentheses are written in double quotes
/// (`\"` and `\\` escape). Errors point at a 1-based column.
pub fn parse_pipeline(src: &str) -> Result<Vec<PassSpec>, PipelineError> {
    if src.trim().is_empty() || src.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut c = Cursor {
        src,
        chars: src.chars().collect(),
        pos: 0,
    };
    let mut specs = Vec::new();
    c.skip_ws();
    loop {
        let column = c.column();
        let name = c.word("a pass name")?;
        if name == "none" {
            c.pos = column - 1;
            return Err(c.error("`none` is the empty pipeline and cannot be combined with passes"));
        }
        c.skip_ws();
        let mut options: Vec<(String, String)> = Vec::new();
        let mut option_columns = Vec::new();
        if c.peek() == Some('(') {
            c.pos += 1;
            c.skip_ws();
            if c.peek() == Some(')') {
                return Err(c.error(format!(
                    "expected an option name (or drop the empty parentheses after `{name}`)"
                )));
            }
            loop {
                c.skip_ws();
                let key_col = c.column();
                let key = c.word("an option name")?;
                if options.iter().any(|(k, _)| *k == key) {
                    c.pos = key_col - 1;
                    return Err(c.error(format!("option `{key}` of `{name}` is given twice")));
                }
                c.skip_ws();
                let value = if c.peek() == Some('=') {
                    c.pos += 1;
                    c.skip_ws();
                    c.value()?
                } else {
                    "true".to_string()
                };
                options.push((key, value));
                option_columns.push(key_col);
                c.skip_ws();
                match c.peek() {
                    Some(',') => c.pos += 1,
                    Some(')') => {
                        c.pos += 1;
                        break;
                    }
                    None => {
                        return Err(c.error(format!(
                            "expected `)` to close the options of `{name}`, found the end"
                        )));
                    }
                    Some(_) => {
                        return Err(c.error(format!(
                            "expected `,` or `)` after option `{}`, found {}",
                            options.last().unwrap().0,
                            c.found()
                        )));
                    }
                }
            }
            c.skip_ws();
        }
        specs.push(PassSpec {
            name,
            options,
            column,
            option_columns,
        });
        match c.peek() {
            None => return Ok(specs),
            Some(',') => {
                c.pos += 1;
                c.skip_ws();
                if c.peek().is_none() {
                    return Err(c.error("expected a pass name after `,`, found the end"));
                }
            }
            Some(_) => {
                return Err(c.error(format!("expected `,` between passes, found {}", c.found())));
            }
        }
    }
}
