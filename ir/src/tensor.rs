//! Concrete tensors as the interpreter holds them, and the plain loops its op rules share
//! (`crate::op::<family>::eval`): broadcasting, reductions along an axis, softmax, silu.

use crate::shape::norm_axis;

/// Element storage: floats for every float dtype (f16/bf16 values are rounded to their precision on
/// cast), i64 for every integer dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match shape");
        Tensor { shape, data: Data::F32(data) }
    }
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match shape");
        Tensor { shape, data: Data::I64(data) }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            Data::F32(_) => None,
        }
    }
}

pub(crate) fn f(t: &Tensor) -> Result<&[f32], String> {
    t.as_f32().ok_or_else(|| "expected a float operand".to_string())
}

pub(crate) fn ints(t: &Tensor) -> Result<&[i64], String> {
    t.as_i64().ok_or_else(|| "expected an integer operand".to_string())
}

pub use crate::numeric::dot;

pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

pub(crate) fn broadcast_binary(a: &Tensor, b: &Tensor, op: impl Fn(f32, f32) -> f32) -> Result<Tensor, String> {
    let (av, bv) = (f(a)?, f(b)?);
    let n = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| -> Vec<usize> { std::iter::repeat_n(1, n - s.len()).chain(s.iter().copied()).collect() };
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let mut out_shape = Vec::with_capacity(n);
    for i in 0..n {
        out_shape.push(match (sa[i], sb[i]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            (x, y) => return Err(format!("cannot broadcast {x} with {y}")),
        });
    }
    let (ta, tb) = (strides(&sa), strides(&sb));
    let bs = |s: &[usize], t: &[usize]| -> Vec<usize> { (0..n).map(|i| if s[i] == 1 { 0 } else { t[i] }).collect() };
    let (ba, bb) = (bs(&sa, &ta), bs(&sb, &tb));
    let total: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; n];
    for _ in 0..total {
        let ia: usize = (0..n).map(|i| idx[i] * ba[i]).sum();
        let ib: usize = (0..n).map(|i| idx[i] * bb[i]).sum();
        out.push(op(av[ia], bv[ib]));
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Tensor::f32(out_shape, out))
}

pub(crate) fn unary(t: &Tensor, op: impl Fn(f64) -> f64) -> Result<Tensor, String> {
    Ok(Tensor::f32(t.shape.clone(), f(t)?.iter().map(|&x| op(x as f64) as f32).collect()))
}

/// Splits `shape` around `axis` into (outer, len, inner).
pub(crate) fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

pub(crate) fn reduce(t: &Tensor, axis: i64, op: impl Fn(&[f64]) -> f64) -> Result<Tensor, String> {
    let x = f(t)?;
    let ax = norm_axis(axis, t.shape.len())?;
    let (outer, len, inner) = around(&t.shape, ax);
    let mut out = vec![0f32; outer * inner];
    let mut lane = vec![0f64; len];
    for o in 0..outer {
        for i in 0..inner {
            for (k, l) in lane.iter_mut().enumerate() {
                *l = x[(o * len + k) * inner + i] as f64;
            }
            out[o * inner + i] = op(&lane) as f32;
        }
    }
    let mut shape = t.shape.clone();
    shape[ax] = 1;
    Ok(Tensor::f32(shape, out))
}

pub(crate) fn softmax_in_place(row: &mut [f64]) {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    for x in row.iter_mut() {
        *x /= sum;
    }
}

pub(crate) fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}
