//! Tensor types with symbolic dimensions.
//!
//! A dimension is a linear expression over named symbols (`batch`, `seq`, `past`, …) with integer
//! coefficients: `576`, `seq`, `past+seq`, `2*seq-1`. That is exactly what a decoder's shapes need (the
//! KV cache grows by `seq` each step) and it keeps equality decidable: two dims are equal iff their
//! normal forms are equal. Concrete sizes are found by binding symbols from the shapes of graph inputs.

use crate::dtype::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Values of symbols, bound while running a graph.
pub type SymEnv = BTreeMap<String, i64>;

/// `constant + Σ coeff·symbol`, symbols sorted by name, no zero coefficients (the normal form).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dim {
    terms: Vec<(String, i64)>,
    constant: i64,
}

impl Dim {
    pub fn fixed(n: i64) -> Dim {
        Dim { terms: Vec::new(), constant: n }
    }

    pub fn sym(name: &str) -> Dim {
        Dim { terms: vec![(name.to_string(), 1)], constant: 0 }
    }

    /// The value when the dim has no symbols.
    pub fn as_fixed(&self) -> Option<i64> {
        self.terms.is_empty().then_some(self.constant)
    }

    /// The symbol name when the dim is exactly one symbol (`seq`, not `seq+1`).
    pub fn as_sym(&self) -> Option<&str> {
        match (self.terms.as_slice(), self.constant) {
            ([(name, 1)], 0) => Some(name),
            _ => None,
        }
    }

    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|(s, _)| s.as_str())
    }

    fn normalize(mut terms: Vec<(String, i64)>, constant: i64) -> Dim {
        terms.sort();
        let mut out: Vec<(String, i64)> = Vec::with_capacity(terms.len());
        for (s, c) in terms {
            match out.last_mut() {
                Some((ls, lc)) if *ls == s => *lc += c,
                _ => out.push((s, c)),
            }
        }
        out.retain(|(_, c)| *c != 0);
        Dim { terms: out, constant }
    }

    pub fn add(&self, other: &Dim) -> Dim {
        let terms = self.terms.iter().chain(&other.terms).cloned().collect();
        Dim::normalize(terms, self.constant + other.constant)
    }

    pub fn scale(&self, k: i64) -> Dim {
        let terms = self.terms.iter().map(|(s, c)| (s.clone(), c * k)).collect();
        Dim::normalize(terms, self.constant * k)
    }

    pub fn sub(&self, other: &Dim) -> Dim {
        self.add(&other.scale(-1))
    }

    /// Evaluates with the given symbol values; `None` if a symbol is unbound or arithmetic overflows.
    pub fn eval(&self, env: &SymEnv) -> Option<i64> {
        let mut v = self.constant;
        for (s, c) in &self.terms {
            v = v.checked_add(env.get(s)?.checked_mul(*c)?)?;
        }
        Some(v)
    }

    /// Parses `past+seq`, `2*seq-1`, `576`.
    pub fn parse(s: &str) -> Result<Dim, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty dimension".into());
        }
        let mut terms = Vec::new();
        let mut constant = 0i64;
        // Split into signed terms.
        let mut pieces: Vec<(i64, String)> = Vec::new();
        let mut sign = 1i64;
        let mut cur = String::new();
        for (i, ch) in s.char_indices() {
            if (ch == '+' || ch == '-') && i > 0 {
                pieces.push((sign, std::mem::take(&mut cur)));
                sign = if ch == '-' { -1 } else { 1 };
            } else if ch == '-' && i == 0 {
                sign = -1;
            } else if !ch.is_whitespace() {
                cur.push(ch);
            }
        }
        pieces.push((sign, cur));
        for (sign, piece) in pieces {
            let (coef, name) = match piece.split_once('*') {
                Some((k, name)) => (
                    k.parse::<i64>().map_err(|_| format!("bad coefficient `{k}` in dimension `{s}`"))?,
                    name.to_string(),
                ),
                None => (1, piece),
            };
            if name.is_empty() {
                return Err(format!("bad dimension `{s}`"));
            }
            if let Ok(n) = name.parse::<i64>() {
                constant += sign * coef * n;
            } else if is_ident(&name) {
                terms.push((name, sign * coef));
            } else {
                return Err(format!("bad dimension term `{name}` in `{s}`"));
            }
        }
        Ok(Dim::normalize(terms, constant))
    }
}

pub(crate) fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return write!(f, "{}", self.constant);
        }
        for (i, (s, c)) in self.terms.iter().enumerate() {
            let (neg, mag) = (*c < 0, c.abs());
            match (i, neg) {
                (0, true) => f.write_str("-")?,
                (_, true) => f.write_str("-")?,
                (0, false) => {}
                (_, false) => f.write_str("+")?,
            }
            if mag != 1 {
                write!(f, "{mag}*")?;
            }
            f.write_str(s)?;
        }
        match self.constant {
            0 => Ok(()),
            c if c > 0 => write!(f, "+{c}"),
            c => write!(f, "{c}"),
        }
    }
}

impl From<i64> for Dim {
    fn from(n: i64) -> Dim {
        Dim::fixed(n)
    }
}
impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::fixed(n as i64)
    }
}
impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        Dim::sym(s)
    }
}

/// Element type and (symbolic) shape of a value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Self {
        TensorType { dtype, shape }
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Concrete shape under `env`, or `None` if a symbol is unbound or a size is negative.
    pub fn concrete(&self, env: &SymEnv) -> Option<Vec<usize>> {
        self.shape.iter().map(|d| d.eval(env).and_then(|v| usize::try_from(v).ok())).collect()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Builds a shape from mixed literals: `shape!["batch", "seq", 576]`.
#[macro_export]
macro_rules! shape {
    ($($d:expr),* $(,)?) => { vec![$($crate::shape::Dim::from($d)),*] };
}

/// Resolves a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_normalize_print_and_parse() {
        let d = Dim::sym("seq").add(&Dim::sym("past"));
        assert_eq!(d.to_string(), "past+seq");
        assert_eq!(Dim::parse("seq + past").unwrap(), d);
        let e = Dim::parse("2*seq-1").unwrap();
        assert_eq!(e.to_string(), "2*seq-1");
        assert_eq!(Dim::parse(&e.to_string()).unwrap(), e);
        assert_eq!(Dim::parse("-seq+3").unwrap().to_string(), "-seq+3");
        assert_eq!(d.sub(&Dim::sym("past")), Dim::sym("seq"));
        assert_eq!(Dim::parse("576").unwrap().as_fixed(), Some(576));
        let env: SymEnv = [("seq".to_string(), 3), ("past".to_string(), 4)].into();
        assert_eq!(e.eval(&env), Some(5));
        assert!(Dim::parse("seq*2").is_err());
        assert!(Dim::parse("").is_err());
        assert!(Dim::parse("a+").is_err());
    }
}
