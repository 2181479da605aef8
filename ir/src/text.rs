//! The canonical text form of a graph, and its parser. `print(parse(print(g))) == print(g)`.
//!
//! ```text
//! graph "tiny" {
//!   %0 = input {name = "x"} : f32[seq, 4]
//!   %1 = weight {name = "w"} : f32[4]
//!   %2 = rms_norm(%0, %1) {eps = 1e-5} : f32[seq, 4]
//!   output "y" = %2
//! }
//! ```
//! Values are numbered by node position; attributes are sorted by name; `#` starts a comment.

use crate::graph::{Graph, Node, ValueId};
use crate::op::{AttrValue, Op};
use crate::shape::{Dim, TensorType};
use std::collections::HashMap;
use std::fmt::Write;

pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "graph {:?} {{", g.name);
    for (i, n) in g.nodes.iter().enumerate() {
        let _ = write!(s, "  %{i} = {}", n.op.name());
        if !n.inputs.is_empty() {
            let ops: Vec<String> = n.inputs.iter().map(|v| v.to_string()).collect();
            let _ = write!(s, "({})", ops.join(", "));
        }
        let attrs = n.op.attrs();
        if !attrs.is_empty() {
            let a: Vec<String> = attrs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            let _ = write!(s, " {{{}}}", a.join(", "));
        }
        let _ = writeln!(s, " : {}", n.ty);
    }
    for (name, v) in &g.outputs {
        let _ = writeln!(s, "  output {name:?} = {v}");
    }
    s.push_str("}\n");
    s
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("IR text line {line}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub msg: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Str(String),
    Word(String),
    Value(String),
    Punct(char),
}

struct Lexer {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-' | '*')
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let mut toks = Vec::new();
    for (lineno, line) in src.lines().enumerate() {
        let line_no = lineno + 1;
        let err = |msg: String| ParseError { line: line_no, msg };
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_whitespace() {
                i += 1;
            } else if c == '#' {
                break;
            } else if c == '"' {
                // JSON-compatible escapes are enough: names are printed with Rust's `{:?}`.
                let mut j = i + 1;
                let mut out = String::new();
                loop {
                    match chars.get(j) {
                        None => return Err(err("unterminated string".into())),
                        Some('"') => break,
                        Some('\\') => {
                            let e = chars.get(j + 1).ok_or_else(|| err("unterminated escape".into()))?;
                            match e {
                                'n' => out.push('\n'),
                                't' => out.push('\t'),
                                'r' => out.push('\r'),
                                '0' => out.push('\0'),
                                '\\' | '"' | '\'' => out.push(*e),
                                'u' => {
                                    // \u{XXXX}
                                    let rest: String = chars[j + 2..].iter().collect();
                                    let close = rest.find('}').ok_or_else(|| err("bad \\u escape".into()))?;
                                    let hex = rest.get(1..close).ok_or_else(|| err("bad \\u escape".into()))?;
                                    let cp = u32::from_str_radix(hex, 16)
                                        .ok()
                                        .and_then(char::from_u32)
                                        .ok_or_else(|| err(format!("bad \\u escape `{hex}`")))?;
                                    out.push(cp);
                                    j += close + 1;
                                }
                                other => return Err(err(format!("unknown escape `\\{other}`"))),
                            }
                            j += 2;
                        }
                        Some(&ch) => {
                            out.push(ch);
                            j += 1;
                        }
                    }
                }
                toks.push((Tok::Str(out), line_no));
                i = j + 1;
            } else if c == '%' {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                if j == i + 1 {
                    return Err(err("`%` must be followed by a value name".into()));
                }
                toks.push((Tok::Value(chars[i + 1..j].iter().collect()), line_no));
                i = j;
            } else if "{}()[],=:".contains(c) {
                toks.push((Tok::Punct(c), line_no));
                i += 1;
            } else if is_word_char(c) {
                let mut j = i;
                while j < chars.len() && is_word_char(chars[j]) {
                    j += 1;
                }
                toks.push((Tok::Word(chars[i..j].iter().collect()), line_no));
                i = j;
            } else {
                return Err(err(format!("unexpected character `{c}`")));
            }
        }
    }
    Ok(toks)
}

impl Lexer {
    fn line(&self) -> usize {
        self.toks.get(self.pos).or(self.toks.last()).map_or(1, |t| t.1)
    }
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { line: self.line(), msg: msg.into() })
    }
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }
    fn next(&mut self) -> Result<Tok, ParseError> {
        match self.toks.get(self.pos) {
            Some((t, _)) => {
                self.pos += 1;
                Ok(t.clone())
            }
            None => self.err("unexpected end of input"),
        }
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: char) -> Result<(), ParseError> {
        if self.eat(c) {
            Ok(())
        } else {
            let found = self.peek().map_or("end of input".to_string(), describe);
            self.err(format!("expected `{c}`, found {found}"))
        }
    }
    fn word(&mut self) -> Result<String, ParseError> {
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => {
                self.pos -= 1;
                self.err(format!("expected a word, found {}", describe(&t)))
            }
        }
    }
    fn string(&mut self) -> Result<String, ParseError> {
        match self.next()? {
            Tok::Str(s) => Ok(s),
            t => {
                self.pos -= 1;
                self.err(format!("expected a string, found {}", describe(&t)))
            }
        }
    }
    fn attr_value(&mut self) -> Result<AttrValue, ParseError> {
        match self.next()? {
            Tok::Str(s) => Ok(AttrValue::Str(s)),
            Tok::Word(w) => Ok(AttrValue::Raw(w)),
            Tok::Punct('[') => {
                let mut items = Vec::new();
                if !self.eat(']') {
                    loop {
                        items.push(self.attr_value()?);
                        if self.eat(']') {
                            break;
                        }
                        self.expect(',')?;
                    }
                }
                Ok(AttrValue::List(items))
            }
            t => {
                self.pos -= 1;
                self.err(format!("expected an attribute value, found {}", describe(&t)))
            }
        }
    }
    fn tensor_type(&mut self) -> Result<TensorType, ParseError> {
        let dt = self.word()?;
        let dtype = match dt.parse() {
            Ok(d) => d,
            Err(e) => return self.err(e),
        };
        self.expect('[')?;
        let mut shape = Vec::new();
        if !self.eat(']') {
            loop {
                let w = self.word()?;
                match Dim::parse(&w) {
                    Ok(d) => shape.push(d),
                    Err(e) => return self.err(e),
                }
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        Ok(TensorType::new(dtype, shape))
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Word(w) => format!("`{w}`"),
        Tok::Value(v) => format!("`%{v}`"),
        Tok::Punct(c) => format!("`{c}`"),
    }
}

/// Parses the text form and verifies the result (recorded types must match the type rules).
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    let mut lx = Lexer { toks: lex(src)?, pos: 0 };
    if lx.word()? != "graph" {
        lx.pos -= 1;
        return lx.err("expected `graph`");
    }
    let mut g = Graph::new(lx.string()?);
    lx.expect('{')?;
    let mut names: HashMap<String, ValueId> = HashMap::new();
    loop {
        if lx.eat('}') {
            break;
        }
        match lx.next()? {
            Tok::Word(w) if w == "output" => {
                let name = lx.string()?;
                lx.expect('=')?;
                let v = match lx.next()? {
                    Tok::Value(v) => v,
                    t => {
                        lx.pos -= 1;
                        return lx.err(format!("expected a value, found {}", describe(&t)));
                    }
                };
                let id = match names.get(&v) {
                    Some(id) => *id,
                    None => return lx.err(format!("output `{name}` uses undefined value %{v}")),
                };
                g.outputs.push((name, id));
            }
            Tok::Value(v) => {
                let line = lx.line();
                lx.expect('=')?;
                let opname = lx.word()?;
                let mut inputs = Vec::new();
                if lx.eat('(') && !lx.eat(')') {
                    loop {
                        match lx.next()? {
                            Tok::Value(a) => match names.get(&a) {
                                Some(id) => inputs.push(*id),
                                None => return lx.err(format!("use of undefined value %{a}")),
                            },
                            t => {
                                lx.pos -= 1;
                                return lx.err(format!("expected an operand, found {}", describe(&t)));
                            }
                        }
                        if lx.eat(')') {
                            break;
                        }
                        lx.expect(',')?;
                    }
                }
                let mut attrs: Vec<(String, AttrValue)> = Vec::new();
                if lx.eat('{') && !lx.eat('}') {
                    loop {
                        let k = lx.word()?;
                        lx.expect('=')?;
                        let val = lx.attr_value()?;
                        if attrs.iter().any(|(n, _)| *n == k) {
                            return lx.err(format!("attribute `{k}` given twice"));
                        }
                        attrs.push((k, val));
                        if lx.eat('}') {
                            break;
                        }
                        lx.expect(',')?;
                    }
                }
                lx.expect(':')?;
                let ty = lx.tensor_type()?;
                let op = Op::from_parts(&opname, &attrs).map_err(|msg| ParseError { line, msg })?;
                let id = ValueId(g.nodes.len() as u32);
                if names.insert(v.clone(), id).is_some() {
                    return Err(ParseError { line, msg: format!("value %{v} defined twice") });
                }
                g.nodes.push(Node { op, inputs, ty });
            }
            t => {
                lx.pos -= 1;
                return lx.err(format!("expected a node or `output`, found {}", describe(&t)));
            }
        }
    }
    if lx.peek().is_some() {
        return lx.err("text after the end of the graph");
    }
    g.verify().map_err(|e| ParseError { line: 0, msg: e.to_string() })?;
    Ok(g)
}

impl crate::Graph {
    /// Debug-build verification, run after every pass (cranelift's `verify_if`).
    pub fn debug_verify(&self) {
        if cfg!(debug_assertions) {
            if let Err(e) = self.verify() {
                panic!("IR verifier failed: {e}\n{}", print(self));
            }
        }
    }
}
