//! A parser for the textual IR written by [`crate::print`], so pass test cases can be small
//! text files:
//!
//! ```text
//! graph main(%x: f32[2]) -> (%y) {
//!   const %w: f32[2] = [1.0, 2.0]
//!   %t = Mul(%x, %w)  // scale
//!   %y = Relu(%t)
//! }
//! ```
//!
//! `parse_model(print_model(m))` prints back to the same text whenever every tensor was
//! printed with its values. What the printer elides cannot be parsed back: tensors shown as
//! `<N B, fnv1a ...>`, opaque attributes (`sparse_tensor<..>`, `type_proto<..>`), sparse
//! initializers, and the model's opaque function / training-info counts; those are errors.
//! Write tensor values out in full instead (any length). A `// text` comment that follows a
//! node on the same line is the node's name; other comments are ignored. The model line is
//! optional. The parser builds the graph with the `Graph` API and does not verify it; call
//! [`crate::verify`] on the result.

use crate::graph::{AttrValue, Attribute, Graph, NodeSpec, ValueId};
use crate::{DType, DeclaredDim, Dim, Model, OpsetImport, Tensor, TensorData, Type, TypedData};
use bytes::Bytes;
use half::{bf16, f16};
use std::fmt;

/// Where and why the text does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses a model: an optional `model ...` line, then one `graph ... { ... }`.
pub fn parse_model(text: &str) -> Result<Model, ParseError> {
    let mut p = Parser::new(text)?;
    let mut model = Model::default();
    if p.eat_ident("model") {
        p.model_header(&mut model)?;
    }
    p.expect_ident("graph")?;
    model.graph = p.graph()?;
    p.expect_end()?;
    Ok(model)
}

/// Parses a single `graph ... { ... }`.
pub fn parse_graph(text: &str) -> Result<Graph, ParseError> {
    let mut p = Parser::new(text)?;
    p.expect_ident("graph")?;
    let g = p.graph()?;
    p.expect_end()?;
    Ok(g)
}

// ---------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// `[A-Za-z_][A-Za-z0-9_.]*`
    Ident(String),
    /// `%name` or `%"name"`.
    Value(String),
    /// A number as written (`-1`, `1.5e-3`, `-inf`).
    Num(String),
    Str(Vec<u8>),
    /// A `// ...` comment following another token on its line.
    Trailing(String),
    /// `(` `)` `[` `]` `{` `}` `,` `=` `:` `::` `->` `..` `@` `<` `>` `?` `_`
    Punct(&'static str),
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Value(s) => write!(f, "`%{s}`"),
            Tok::Num(s) => write!(f, "`{s}`"),
            Tok::Str(_) => f.write_str("a string"),
            Tok::Trailing(_) => f.write_str("a comment"),
            Tok::Punct(p) => write!(f, "`{p}`"),
            Tok::End => f.write_str("the end"),
        }
    }
}

struct Token {
    tok: Tok,
    line: usize,
    column: usize,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-')
}

/// Whether `chars[j]` continues a bare `%name`: a name character, where a `:` counts only
/// if another name character follows (so `%x: f32` ends the name before the colon).
fn bare_name_continues(chars: &[char], j: usize) -> bool {
    let Some(&c) = chars.get(j) else {
        return false;
    };
    is_name_char(c) && (c != ':' || chars.get(j + 1).is_some_and(|&n| is_name_char(n)))
}

fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut out = Vec::new();
    for (li, line) in text.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        let start_count = out.len();
        let err = |i: usize, m: String| ParseError {
            line: li + 1,
            column: i + 1,
            message: m,
        };
        while i < chars.len() {
            let c = chars[i];
            let col = i;
            let next = chars.get(i + 1).copied();
            let tok = if c.is_whitespace() {
                i += 1;
                continue;
            } else if c == '/' && next == Some('/') {
                let text: String = chars[i + 2..].iter().collect();
                i = chars.len();
                if out.len() == start_count {
                    continue; // a comment line
                }
                Tok::Trailing(unescape_debug(text.trim()))
            } else if c == '%' {
                if next == Some('"') {
                    let (s, end) = string(&chars, i + 1).map_err(|m| err(i + 1, m))?;
                    i = end;
                    Tok::Value(
                        String::from_utf8(s).map_err(|_| err(col, "name is not UTF-8".into()))?,
                    )
                } else {
                    let mut j = i + 1;
                    while bare_name_continues(&chars, j) {
                        j += 1;
                    }
                    if j == i + 1 {
                        return Err(err(i, "expected a value name after `%`".into()));
                    }
                    let s: String = chars[i + 1..j].iter().collect();
                    i = j;
                    Tok::Value(s)
                }
            } else if c == '"' {
                let (s, end) = string(&chars, i).map_err(|m| err(col, m))?;
                i = end;
                Tok::Str(s)
            } else if c.is_ascii_digit()
                || (c == '-' && next.is_some_and(|n| n.is_ascii_digit() || n == 'i'))
            {
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_ascii_alphanumeric()
                        || chars[j] == '.'
                        || (matches!(chars[j], '-' | '+') && matches!(chars[j - 1], 'e' | 'E')))
                {
                    j += 1;
                }
                let s: String = chars[i..j].iter().collect();
                i = j;
                Tok::Num(s)
            } else if c.is_ascii_alphabetic() || c == '_' {
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_ascii_alphanumeric() || matches!(chars[j], '_' | '.'))
                {
                    j += 1;
                }
                let s: String = chars[i..j].iter().collect();
                i = j;
                if s == "_" {
                    Tok::Punct("_")
                } else {
                    Tok::Ident(s)
                }
            } else {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let p = match two.as_str() {
                    "::" => Some("::"),
                    "->" => Some("->"),
                    ".." => Some(".."),
                    _ => None,
                };
                if let Some(p) = p {
                    i += 2;
                    Tok::Punct(p)
                } else {
                    i += 1;
                    Tok::Punct(match c {
                        '(' => "(",
                        ')' => ")",
                        '[' => "[",
                        ']' => "]",
                        '{' => "{",
                        '}' => "}",
                        ',' => ",",
                        '=' => "=",
                        ':' => ":",
                        '@' => "@",
                        '<' => "<",
                        '>' => ">",
                        '?' => "?",
                        _ => return Err(err(col, format!("unexpected character `{c}`"))),
                    })
                }
            };
            out.push(Token {
                tok,
                line: li + 1,
                column: col + 1,
            });
        }
    }
    let line = text.lines().count() + 1;
    out.push(Token {
        tok: Tok::End,
        line,
        column: 1,
    });
    Ok(out)
}

/// A `"..."` string starting at `chars[start]`; returns its bytes and the index after it.
fn string(chars: &[char], start: usize) -> Result<(Vec<u8>, usize), String> {
    let mut out = Vec::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '"' => return Ok((out, i + 1)),
            '\\' => {
                let e = chars.get(i + 1).copied();
                match e {
                    Some('"') => out.push(b'"'),
                    Some('\\') => out.push(b'\\'),
                    Some('n') => out.push(b'\n'),
                    Some('t') => out.push(b'\t'),
                    Some('x') => {
                        let hex: String = chars.get(i + 2..i + 4).unwrap_or(&[]).iter().collect();
                        let b = u8::from_str_radix(&hex, 16)
                            .map_err(|_| format!("bad escape `\\x{hex}`"))?;
                        out.push(b);
                        i += 2;
                    }
                    _ => return Err("unknown escape in string".into()),
                }
                i += 2;
            }
            c => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += 1;
            }
        }
    }
    Err("unterminated string".into())
}

/// Undoes the printer's escaping of node names in comments.
fn unescape_debug(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('u') if it.peek() == Some(&'{') => {
                it.next();
                let hex: String = it.by_ref().take_while(|&c| c != '}').collect();
                if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(ch);
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------

struct Parser {
    toks: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn new(text: &str) -> Result<Parser, ParseError> {
        Ok(Parser {
            toks: lex(text)?,
            pos: 0,
        })
    }

    fn peek(&self) -> &Tok {
        &self.toks[self.pos].tok
    }

    fn peek2(&self) -> &Tok {
        &self.toks[(self.pos + 1).min(self.toks.len() - 1)].tok
    }

    fn bump(&mut self) -> Tok {
        let t = self.toks[self.pos].tok.clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn error(&self, message: impl Into<String>) -> ParseError {
        let t = &self.toks[self.pos];
        ParseError {
            line: t.line,
            column: t.column,
            message: message.into(),
        }
    }

    fn error_at(&self, pos: usize, message: impl Into<String>) -> ParseError {
        let t = &self.toks[pos];
        ParseError {
            line: t.line,
            column: t.column,
            message: message.into(),
        }
    }

    fn expected(&self, what: &str) -> ParseError {
        self.error(format!("expected {what}, found {}", self.peek()))
    }

    fn eat(&mut self, p: &str) -> bool {
        if matches!(self.peek(), Tok::Punct(q) if *q == p) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, p: &str) -> Result<(), ParseError> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{p}`")))
        }
    }

    fn eat_ident(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Tok::Ident(q) if q == s) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect_ident(&mut self, s: &str) -> Result<(), ParseError> {
        if self.eat_ident(s) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{s}`")))
        }
    }

    fn expect_end(&mut self) -> Result<(), ParseError> {
        self.skip_comments();
        match self.peek() {
            Tok::End => Ok(()),
            _ => Err(self.expected("the end of the text")),
        }
    }

    fn skip_comments(&mut self) {
        while matches!(self.peek(), Tok::Trailing(_)) {
            self.bump();
        }
    }

    fn trailing(&mut self) -> Option<String> {
        match self.peek() {
            Tok::Trailing(s) => {
                let s = s.clone();
                self.bump();
                Some(s)
            }
            _ => None,
        }
    }

    fn ident(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek() {
            Tok::Ident(s) => {
                let s = s.clone();
                self.bump();
                Ok(s)
            }
            Tok::Str(b) => {
                let s =
                    String::from_utf8(b.clone()).map_err(|_| self.error("name is not UTF-8"))?;
                self.bump();
                Ok(s)
            }
            _ => Err(self.expected(what)),
        }
    }

    fn int(&mut self) -> Result<i64, ParseError> {
        match self.peek() {
            Tok::Num(s) => {
                let v = s
                    .parse()
                    .map_err(|_| self.error(format!("`{s}` is not an integer")))?;
                self.bump();
                Ok(v)
            }
            _ => Err(self.expected("an integer")),
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Tok::Str(b) => {
                let s =
                    String::from_utf8(b.clone()).map_err(|_| self.error("string is not UTF-8"))?;
                self.bump();
                Ok(s)
            }
            _ => Err(self.expected("a string")),
        }
    }

    fn model_header(&mut self, m: &mut Model) -> Result<(), ParseError> {
        while let Tok::Ident(key) = self.peek().clone() {
            if key == "graph" {
                break;
            }
            self.bump();
            self.expect("=")?;
            match key.as_str() {
                "ir" => m.ir_version = Some(self.int()?),
                "version" => m.model_version = Some(self.int()?),
                "producer" => m.producer_name = Some(self.string()?),
                "domain" => m.domain = Some(self.string()?),
                "opsets" => {
                    self.expect("[")?;
                    while !self.eat("]") {
                        let d = self.ident("an opset domain")?;
                        self.expect(":")?;
                        let version = if self.eat("?") {
                            None
                        } else {
                            Some(self.int()?)
                        };
                        m.opset_imports.push(OpsetImport {
                            domain: if d == "ai.onnx" { None } else { Some(d) },
                            version,
                        });
                        if !self.eat(",") {
                            self.expect("]")?;
                            break;
                        }
                    }
                }
                "functions" | "training_info" | "configuration" => {
                    return Err(self.error(format!(
                        "`{key}` are opaque in the textual IR and cannot be parsed back"
                    )));
                }
                _ => return Err(self.error(format!("unknown model field `{key}`"))),
            }
        }
        Ok(())
    }

    /// `f32[2, batch]`, `?[..]`.
    fn ty(&mut self) -> Result<Type, ParseError> {
        let elem = if self.eat("?") {
            None
        } else {
            let name = self.ident("a type")?;
            if name == "opaque" {
                return Err(self.error("opaque types cannot be parsed back"));
            }
            Some(
                DType::from_name(&name)
                    .ok_or_else(|| self.error(format!("unknown element type `{name}`")))?,
            )
        };
        self.expect("[")?;
        let shape = if self.eat("..") {
            self.expect("]")?;
            None
        } else {
            let mut dims = Vec::new();
            while !self.eat("]") {
                let dim = match self.peek().clone() {
                    Tok::Num(_) => Dim::Known(self.int()?),
                    Tok::Punct("?") => {
                        self.bump();
                        Dim::Unknown
                    }
                    Tok::Ident(s) => {
                        self.bump();
                        Dim::Sym(s)
                    }
                    _ => return Err(self.expected("a dimension")),
                };
                dims.push(DeclaredDim {
                    dim,
                    denotation: None,
                });
                if !self.eat(",") {
                    self.expect("]")?;
                    break;
                }
            }
            Some(dims)
        };
        Ok(Type::Tensor {
            elem,
            shape,
            denotation: None,
        })
    }

    /// `%name` or `%name: type`.
    fn typed_value(&mut self) -> Result<(String, Option<Type>), ParseError> {
        let Tok::Value(name) = self.peek().clone() else {
            return Err(self.expected("a value (`%name`)"));
        };
        self.bump();
        let ty = if self.eat(":") {
            Some(self.ty()?)
        } else {
            None
        };
        Ok((name, ty))
    }

    fn value_list(&mut self) -> Result<Vec<(String, Option<Type>)>, ParseError> {
        self.expect("(")?;
        let mut out = Vec::new();
        while !self.eat(")") {
            out.push(self.typed_value()?);
            if !self.eat(",") {
                self.expect(")")?;
                break;
            }
        }
        Ok(out)
    }

    /// After `graph`: `name(inputs) [outer(..)] -> (outputs) { body }`.
    fn graph(&mut self) -> Result<Graph, ParseError> {
        let name = self.ident("a graph name")?;
        let mut g = Graph::new(&name);
        let graph_err = |p: &Parser, e: crate::GraphError| p.error(e.to_string());
        for (n, ty) in self.value_list()? {
            g.add_input(&n, ty).map_err(|e| graph_err(self, e))?;
        }
        if self.eat_ident("outer") {
            for (n, ty) in self.value_list()? {
                let id = g.add_outer(&n).map_err(|e| graph_err(self, e))?;
                g.value_mut(id).ty = ty;
            }
        }
        self.expect("->")?;
        let outputs = self.value_list()?;
        self.expect("{")?;
        self.skip_comments();
        loop {
            match self.peek().clone() {
                Tok::Punct("}") => {
                    self.bump();
                    break;
                }
                Tok::Ident(kw) if kw == "const" || kw == "default" => {
                    self.bump();
                    let (n, ty) = self.typed_value()?;
                    let Some(ty) = ty else {
                        return Err(self.error(format!("constant `%{n}` needs a type")));
                    };
                    self.expect("=")?;
                    let t = self.tensor_payload(&ty)?;
                    if kw == "default" && g.find(&n).is_none() {
                        return Err(self.error(format!("`default %{n}` names no graph input")));
                    }
                    g.add_initializer(&n, t).map_err(|e| graph_err(self, e))?;
                }
                Tok::Ident(kw) if kw == "sparse_initializer" => {
                    return Err(
                        self.error("sparse initializers are opaque and cannot be parsed back")
                    );
                }
                Tok::End => return Err(self.expected("`}` closing the graph")),
                _ => self.node(&mut g)?,
            }
            self.skip_comments();
        }
        for (n, ty) in outputs {
            let id = g.value_named(&n);
            if ty.is_some() {
                g.value_mut(id).ty = ty;
            }
            g.outputs.push(id);
        }
        Ok(g)
    }

    fn node(&mut self, g: &mut Graph) -> Result<(), ParseError> {
        // Results.
        let mut outs: Vec<(String, Option<Type>)> = Vec::new();
        if matches!(self.peek(), Tok::Value(_) | Tok::Punct("_")) {
            loop {
                if self.eat("_") {
                    outs.push((String::new(), None));
                } else {
                    outs.push(self.typed_value()?);
                }
                if !self.eat(",") {
                    break;
                }
            }
            self.expect("=")?;
        }
        // Op.
        let first = self.ident("an op name")?;
        let (domain, op) = if self.eat("::") {
            (first, self.ident("an op name")?)
        } else {
            (String::new(), first)
        };
        // Operands.
        self.expect("(")?;
        let mut inputs: Vec<Option<ValueId>> = Vec::new();
        while !self.eat(")") {
            if self.eat("_") {
                inputs.push(None);
            } else {
                let Tok::Value(n) = self.peek().clone() else {
                    return Err(self.expected("an operand (`%name` or `_`)"));
                };
                self.bump();
                inputs.push(Some(g.value_named(&n)));
            }
            if !self.eat(",") {
                self.expect(")")?;
                break;
            }
        }
        let mut captures = Vec::new();
        if self.eat_ident("captures") {
            for (n, _) in self.value_list()? {
                captures.push(g.value_named(&n));
            }
        }
        let mut name = self.trailing();
        let mut attrs = Vec::new();
        if self.eat("{") {
            if let Some(n) = self.trailing() {
                name = Some(n);
            }
            self.skip_comments();
            while !self.eat("}") {
                attrs.push(self.attribute()?);
                self.eat(",");
                self.skip_comments();
            }
            if let Some(n) = self.trailing() {
                name = Some(n);
            }
        }
        let spec = NodeSpec {
            name: name.unwrap_or_default(),
            op_type: op,
            domain,
            attrs,
            ..Default::default()
        };
        let out_names: Vec<&str> = outs.iter().map(|(n, _)| n.as_str()).collect();
        let id = g
            .add_node(spec, &inputs, &out_names)
            .map_err(|e| self.error(e.to_string()))?;
        for (slot, (_, ty)) in outs.into_iter().enumerate() {
            if let (Some(v), Some(ty)) = (g.node(id).output(slot), ty) {
                g.value_mut(v).ty = Some(ty);
            }
        }
        if !captures.is_empty() {
            g.set_captures(id, captures);
        }
        Ok(())
    }

    fn attribute(&mut self) -> Result<Attribute, ParseError> {
        let name = self.ident("an attribute name")?;
        self.expect("=")?;
        let mut attr = Attribute {
            name,
            value: AttrValue::Undefined,
            doc_string: None,
            ref_attr_name: None,
        };
        if self.eat("@") {
            attr.ref_attr_name = Some(self.ident("an attribute reference")?);
            return Ok(attr);
        }
        attr.value = self.attr_value()?;
        Ok(attr)
    }

    fn is_tensor_start(&self) -> bool {
        match (self.peek(), self.peek2()) {
            (Tok::Ident(s), Tok::Punct("[")) => DType::from_name(s).is_some(),
            (Tok::Punct("?"), _) => true,
            _ => false,
        }
    }

    fn tensor(&mut self) -> Result<Tensor, ParseError> {
        let ty = self.ty()?;
        self.tensor_payload(&ty)
    }

    fn attr_value(&mut self) -> Result<AttrValue, ParseError> {
        if self.is_tensor_start() {
            return Ok(AttrValue::Tensor(self.tensor()?));
        }
        match self.peek().clone() {
            Tok::Num(s) => {
                self.bump();
                if let Ok(i) = s.parse::<i64>() {
                    Ok(AttrValue::Int(i))
                } else {
                    Ok(AttrValue::Float(
                        parse_f64(&s).ok_or_else(|| self.error(format!("`{s}` is not a number")))?
                            as f32,
                    ))
                }
            }
            Tok::Ident(s) if s == "inf" || s == "NaN" => {
                self.bump();
                Ok(AttrValue::Float(if s == "inf" {
                    f32::INFINITY
                } else {
                    f32::NAN
                }))
            }
            Tok::Str(b) => {
                self.bump();
                Ok(AttrValue::String(Bytes::from(b)))
            }
            Tok::Ident(s) if s == "undefined" => {
                self.bump();
                Ok(AttrValue::Undefined)
            }
            Tok::Ident(s) if s == "graph" => {
                self.bump();
                Ok(AttrValue::Graph(Box::new(self.graph()?)))
            }
            Tok::Ident(s) if s == "sparse_tensor" || s == "type_proto" => Err(self.error(format!(
                "`{s}` attributes are opaque and cannot be parsed back"
            ))),
            Tok::Punct("[") => {
                self.bump();
                self.skip_comments();
                if self.eat_ident("graph") {
                    let mut gs = vec![self.graph()?];
                    self.skip_comments();
                    while self.eat_ident("graph") {
                        gs.push(self.graph()?);
                        self.skip_comments();
                    }
                    self.expect("]")?;
                    return Ok(AttrValue::Graphs(gs));
                }
                if self.is_tensor_start() {
                    let mut ts = Vec::new();
                    loop {
                        ts.push(self.tensor()?);
                        if !self.eat(",") {
                            break;
                        }
                    }
                    self.expect("]")?;
                    return Ok(AttrValue::Tensors(ts));
                }
                let items: Vec<Tok> = self.list_items_at()?.into_iter().map(|(t, _)| t).collect();
                if items.iter().all(|t| matches!(t, Tok::Str(_))) && !items.is_empty() {
                    return Ok(AttrValue::Strings(
                        items
                            .into_iter()
                            .map(|t| match t {
                                Tok::Str(b) => Bytes::from(b),
                                _ => unreachable!(),
                            })
                            .collect(),
                    ));
                }
                let ints: Option<Vec<i64>> = items
                    .iter()
                    .map(|t| match t {
                        Tok::Num(s) => s.parse().ok(),
                        _ => None,
                    })
                    .collect();
                if let Some(v) = ints {
                    return Ok(AttrValue::Ints(v));
                }
                let floats: Option<Vec<f32>> =
                    items.iter().map(|t| num(t).map(|v| v as f32)).collect();
                floats
                    .map(AttrValue::Floats)
                    .ok_or_else(|| self.error("a list must hold only numbers or only strings"))
            }
            _ => Err(self.expected("an attribute value")),
        }
    }

    /// Items of `[a, b, ...]` after the `[`, through the `]`, with their token positions.
    fn list_items_at(&mut self) -> Result<Vec<(Tok, usize)>, ParseError> {
        let mut items = Vec::new();
        while !self.eat("]") {
            match self.peek() {
                Tok::Num(_) | Tok::Str(_) | Tok::Ident(_) => {
                    let pos = self.pos;
                    items.push((self.bump(), pos));
                }
                _ => return Err(self.expected("a list element")),
            }
            if !self.eat(",") {
                self.expect("]")?;
                break;
            }
        }
        Ok(items)
    }

    /// `[v, ...]` or a scalar `v`, for a tensor of type `ty` (known dims).
    fn tensor_payload(&mut self, ty: &Type) -> Result<Tensor, ParseError> {
        let (Some(dtype), Some(shape)) = (ty.elem(), ty.shape()) else {
            return Err(self.error("a constant needs an element type and a shape"));
        };
        let dims: Vec<i64> = shape
            .iter()
            .map(|d| {
                d.known()
                    .ok_or_else(|| self.error("constant dims must be numbers"))
            })
            .collect::<Result<_, _>>()?;
        if self.eat("<") {
            return Err(self.error(
                "this tensor's values were elided (`<N B, fnv1a ...>`); write them out to parse it",
            ));
        }
        let start = self.pos;
        let items = if self.eat("[") {
            self.list_items_at()?
        } else {
            match self.peek() {
                Tok::Num(_) | Tok::Str(_) | Tok::Ident(_) => vec![(self.bump(), start)],
                _ => return Err(self.expected("tensor values")),
            }
        };
        let numel: i64 = dims.iter().product();
        if items.len() as i64 != numel {
            return Err(self.error_at(
                start,
                format!(
                    "{dtype}{dims:?} needs {numel} values, found {}",
                    items.len()
                ),
            ));
        }
        let bad = |p: &Parser, t: &(Tok, usize)| {
            p.error_at(t.1, format!("{} is not a valid {dtype} value", t.0))
        };
        let mut raw: Vec<u8> = Vec::new();
        if dtype == DType::String {
            let strs: Vec<Bytes> = items
                .iter()
                .map(|t| match &t.0 {
                    Tok::Str(b) => Ok(Bytes::from(b.clone())),
                    _ => Err(bad(self, t)),
                })
                .collect::<Result<_, _>>()?;
            let mut t = Tensor::from_raw(dtype, dims, Bytes::new());
            t.data = TensorData::Typed(TypedData::Str(strs));
            return Ok(t);
        }
        if matches!(dtype, DType::I4 | DType::U4) {
            raw.resize(items.len().div_ceil(2), 0);
            for (i, t) in items.iter().enumerate() {
                let v = int_of(&t.0).ok_or_else(|| bad(self, t))?;
                let ok = if dtype == DType::I4 {
                    (-8..=7).contains(&v)
                } else {
                    (0..=15).contains(&v)
                };
                if !ok {
                    return Err(bad(self, t));
                }
                raw[i / 2] |= ((v as u8) & 0xF) << ((i % 2) * 4);
            }
            return Ok(Tensor::from_raw(dtype, dims, raw.into()));
        }
        for t in &items {
            macro_rules! int {
                ($ty:ty) => {{
                    let v = int_of(&t.0)
                        .and_then(|v| <$ty>::try_from(v).ok())
                        .ok_or_else(|| bad(self, t))?;
                    raw.extend_from_slice(&v.to_le_bytes());
                }};
            }
            match dtype {
                DType::F32 => raw.extend_from_slice(
                    &(num(&t.0).ok_or_else(|| bad(self, t))? as f32).to_le_bytes(),
                ),
                DType::F64 => {
                    raw.extend_from_slice(&num(&t.0).ok_or_else(|| bad(self, t))?.to_le_bytes())
                }
                DType::F16 => raw.extend_from_slice(
                    &f16::from_f64(num(&t.0).ok_or_else(|| bad(self, t))?).to_le_bytes(),
                ),
                DType::BF16 => raw.extend_from_slice(
                    &bf16::from_f64(num(&t.0).ok_or_else(|| bad(self, t))?).to_le_bytes(),
                ),
                DType::Bool => raw.push(match &t.0 {
                    Tok::Ident(s) if s == "true" => 1,
                    Tok::Ident(s) if s == "false" => 0,
                    _ => return Err(bad(self, t)),
                }),
                DType::I8 => int!(i8),
                DType::U8 => int!(u8),
                DType::I16 => int!(i16),
                DType::U16 => int!(u16),
                DType::I32 => int!(i32),
                DType::U32 => int!(u32),
                DType::I64 => int!(i64),
                DType::U64 => {
                    let v: u64 = match &t.0 {
                        Tok::Num(s) => s.parse().map_err(|_| bad(self, t))?,
                        _ => return Err(bad(self, t)),
                    };
                    raw.extend_from_slice(&v.to_le_bytes());
                }
                other => {
                    return Err(self.error_at(
                        start,
                        format!("{other} literals are not supported; use raw data from a model"),
                    ));
                }
            }
        }
        Ok(Tensor::from_raw(dtype, dims, raw.into()))
    }
}

fn parse_f64(s: &str) -> Option<f64> {
    match s {
        "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn num(t: &Tok) -> Option<f64> {
    match t {
        Tok::Num(s) | Tok::Ident(s) => parse_f64(s),
        _ => None,
    }
}

fn int_of(t: &Tok) -> Option<i64> {
    match t {
        Tok::Num(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::print::{print_graph, print_model};
    use crate::verify;

    #[test]
    fn parses_a_small_graph() {
        let text = "\
// a comment line
graph main(%x: f32[batch, 2], %c: bool[]) -> (%y: f32[batch, 2]) {
  const %w: f32[2] = [1.0, 2.0]
  const %k: i64[] = 3
  %t = Mul(%x, %w)  // scale
  %y: f32[batch, 2], _ = Dropout(%t, _) {ratio = 0.5, seed = [1, 2], mode = \"x y\"}
}
";
        let g = parse_graph(text).unwrap();
        verify::verify_graph(&g).unwrap();
        assert_eq!(g.node_count(), 2);
        let (_, mul) = g.nodes().next().unwrap();
        assert_eq!(mul.name, "scale");
        assert_eq!(
            g.const_tensor(g.find("w").unwrap())
                .unwrap()
                .to_f32()
                .unwrap(),
            vec![1.0, 2.0]
        );
        // Printing normalizes spacing and drops line comments; it then round-trips.
        let printed = print_graph(&g);
        assert_eq!(print_graph(&parse_graph(&printed).unwrap()), printed);
    }

    #[test]
    fn round_trips_every_printed_construct() {
        let text = r#"model ir=10 opsets=[ai.onnx:18, com.microsoft:1] producer="t 1" domain="d" version=2
graph main(%x: f32[2], %"odd name": ?[..], %flag: bool[]) -> (%out, %y: f32[2]) {
  const %a: f16[2] = [0.5, -2.0]
  const %b: bf16[] = 1.5
  const %c: i4[3] = [-8, 7, 0]
  const %d: u4[1] = [15]
  const %e: bool[2] = [true, false]
  const %f: f64[1] = [0.1]
  const %g: u64[1] = [18446744073709551615]
  const %s: str[2] = ["a", "b\"c"]
  default %x: f32[2] = [inf, -0.0]
  %y: f32[2] = com.microsoft::Foo(%x, _, %a) {t = i32[2, 1] [1, 2], ts = [f32[] 1.0, i64[1] [2]], fs = [1e-5, -inf], r = @alpha, u = undefined, ss = ["p", ""]}  // n "quoted"
  %out = If(%flag) captures(%y, %x) {  // if
    then_branch = graph then() outer(%y) -> (%t) {
      %t = Identity(%y)
    }
    else_branch = graph else() outer(%x) -> (%x) {
    }
    branches = [
      graph one() -> () {
      }
      graph two() -> () {
      }
    ]
    k = 1
  }
}
"#;
        let m = parse_model(text).unwrap();
        assert_eq!(print_model(&m), text);
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let e = parse_graph("graph g() -> () {\n  %y = Relu(%x %z)\n}").unwrap_err();
        assert_eq!((e.line, e.column), (2, 16));
        let e = parse_graph("graph g() -> () {\n  const %w: f32[3] = [1.0]\n}").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2, column 22: f32[3] needs 3 values, found 1"
        );
        let e = parse_graph("graph g() -> () {\n  const %w: f32[64] = <256 B, fnv1a 00>\n}")
            .unwrap_err();
        assert!(e.message.contains("elided"), "{e}");
        let e = parse_graph("graph g() -> () {\n  %y = Relu(%x) $\n}").unwrap_err();
        assert_eq!(e.to_string(), "line 2, column 17: unexpected character `$`");
        let e = parse_graph("graph g() -> () {\n").unwrap_err();
        assert!(e.message.contains("closing the graph"), "{e}");
        let e = parse_graph("graph g(%x) -> () {\n  %x = Relu(%x)\n}").unwrap_err();
        assert!(e.message.contains("defined twice"), "{e}");
    }
}
