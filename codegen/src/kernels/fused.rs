//! Fused elementwise kernels: a tree of f32 elementwise ops (add, mul, exp, silu, …) over inputs that
//! broadcast by row or column, computed in one pass over the result, so chains of elementwise ops never
//! write their intermediates to memory.
//!
//! The body is generated as MLIR — one `linalg.generic` on memrefs whose region is the fused expression —
//! and lowered to LLVM IR by [`crate::mlir`]; [`FusedKernel::wrap`] adapts it to the uniform kernel ABI.
//! Work items are rows of the result (its last dim is the row, when that dim is a constant).

use super::emit::{Emitter, R};
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::{BasicMetadataValueEnum, FunctionValue};
use kiln_ir::Op;
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// How an input is indexed by the result's (row, column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bcast {
    /// Same shape as the result.
    Full,
    /// One row of `cols`, shared by every row (a bias, a norm weight).
    Row,
    /// One value per row (a per-row scale).
    Col,
    /// One value for everything.
    Scalar,
}

/// The elementwise ops a fused kernel can compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EwOp {
    Add,
    Sub,
    Mul,
    Div,
    Neg,
    Exp,
    Sqrt,
    Rsqrt,
    Sigmoid,
    Silu,
    SwiGlu,
    /// `a` where `|a| > b`, else 0 (`b` a per-channel threshold).
    Threshold,
    GeluTanh,
}

impl EwOp {
    /// The fused-kernel op computing IR op `op`, if it is elementwise.
    pub fn from_op(op: &Op) -> Option<EwOp> {
        Some(match op {
            Op::Add => EwOp::Add,
            Op::Sub => EwOp::Sub,
            Op::Mul => EwOp::Mul,
            Op::Div => EwOp::Div,
            Op::Neg => EwOp::Neg,
            Op::Exp => EwOp::Exp,
            Op::Sqrt => EwOp::Sqrt,
            Op::Rsqrt => EwOp::Rsqrt,
            Op::Sigmoid => EwOp::Sigmoid,
            Op::Silu => EwOp::Silu,
            Op::SwiGlu => EwOp::SwiGlu,
            Op::Threshold => EwOp::Threshold,
            Op::GeluTanh => EwOp::GeluTanh,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            EwOp::Add => "add",
            EwOp::Sub => "sub",
            EwOp::Mul => "mul",
            EwOp::Div => "div",
            EwOp::Neg => "neg",
            EwOp::Exp => "exp",
            EwOp::Sqrt => "sqrt",
            EwOp::Rsqrt => "rsqrt",
            EwOp::Sigmoid => "sigmoid",
            EwOp::Silu => "silu",
            EwOp::SwiGlu => "swiglu",
            EwOp::Threshold => "threshold",
            EwOp::GeluTanh => "gelu_tanh",
        }
    }
}

/// An operand of a step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arg {
    /// The kernel's `i`th input buffer (at this element, per its [`Bcast`]).
    Input(usize),
    /// A literal.
    Const(f32),
    /// The value of an earlier step.
    Step(usize),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub op: EwOp,
    pub args: Vec<Arg>,
}

/// bufs [inputs…, y]; items: rows of `cols`; y = the last step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedKernel {
    pub cols: usize,
    pub inputs: Vec<Bcast>,
    /// In evaluation order; each reads inputs, literals and earlier steps.
    pub steps: Vec<Step>,
}

impl FusedKernel {
    /// A readable, unique symbol: the ops, the row width, and a hash of the whole spec.
    pub fn symbol(&self) -> String {
        let json = serde_json::to_string(self).expect("serialisable");
        let hash = blake3::hash(json.as_bytes()).to_hex();
        let mut ops: Vec<&str> = self.steps.iter().map(|s| s.op.name()).collect();
        if ops.len() > 4 {
            ops.truncate(4);
            ops.push("etc");
        }
        format!("kiln_fused_{}_c{}_{}", ops.join("_"), self.cols, &hash[..12])
    }

    fn body_symbol(&self) -> String {
        format!("{}_body", self.symbol())
    }

    /// The body as an MLIR function: `linalg.generic` over `[rows, cols]`, one memref per input and the
    /// result, the fused expression as its region.
    pub fn mlir(&self) -> String {
        let c = self.cols;
        let memref = |b: Bcast| match b {
            Bcast::Full => format!("memref<?x{c}xf32>"),
            Bcast::Row => format!("memref<{c}xf32>"),
            Bcast::Col => "memref<?xf32>".to_string(),
            Bcast::Scalar => "memref<1xf32>".to_string(),
        };
        let map = |b: Bcast| match b {
            Bcast::Full => "affine_map<(r, c) -> (r, c)>",
            Bcast::Row => "affine_map<(r, c) -> (c)>",
            Bcast::Col => "affine_map<(r, c) -> (r)>",
            Bcast::Scalar => "affine_map<(r, c) -> (0)>",
        };
        let n = self.inputs.len();
        let params: Vec<String> =
            self.inputs.iter().enumerate().map(|(i, &b)| format!("%in{i}: {}", memref(b))).collect();
        let ins: Vec<String> = (0..n).map(|i| format!("%in{i}")).collect();
        let in_types: Vec<String> = self.inputs.iter().map(|&b| memref(b)).collect();
        let maps: Vec<&str> = self.inputs.iter().map(|&b| map(b)).chain([map(Bcast::Full)]).collect();
        let block_args: Vec<String> = (0..n).map(|i| format!("%a{i}: f32")).collect();
        let out_ty = memref(Bcast::Full);

        let mut s = String::new();
        let _ = writeln!(s, "func.func private @{}({}, %out: {out_ty}) {{", self.body_symbol(), params.join(", "));
        let _ = writeln!(
            s,
            "  linalg.generic {{indexing_maps = [{}], iterator_types = [\"parallel\", \"parallel\"]}}",
            maps.join(", ")
        );
        if n > 0 {
            let _ = writeln!(s, "      ins({} : {})", ins.join(", "), in_types.join(", "));
        }
        let _ = writeln!(s, "      outs(%out : {out_ty}) {{");
        let _ = writeln!(s, "  ^bb0({}%y: f32):", block_args.iter().map(|a| format!("{a}, ")).collect::<String>());
        let _ = writeln!(s, "    %one = arith.constant 1.0 : f32");
        if self.steps.iter().any(|st| st.op == EwOp::Threshold) {
            let _ = writeln!(s, "    %zero = arith.constant 0.0 : f32");
        }
        let mut consts = Vec::new();
        for step in &self.steps {
            for a in &step.args {
                if let Arg::Const(v) = a {
                    if !consts.contains(&v.to_bits()) {
                        // Hexadecimal float literals are exact.
                        let _ = writeln!(s, "    %k{:08x} = arith.constant 0x{:08X} : f32", v.to_bits(), v.to_bits());
                        consts.push(v.to_bits());
                    }
                }
            }
        }
        let arg = |a: &Arg| match a {
            Arg::Input(i) => format!("%a{i}"),
            Arg::Const(v) => format!("%k{:08x}", v.to_bits()),
            Arg::Step(i) => format!("%s{i}"),
        };
        for (i, step) in self.steps.iter().enumerate() {
            let a: Vec<String> = step.args.iter().map(arg).collect();
            let bin = |op: &str| format!("    %s{i} = {op} {}, {} : f32\n", a[0], a[1]);
            let un = |op: &str| format!("    %s{i} = {op} {} : f32\n", a[0]);
            // sigmoid(x) = 1 / (1 + exp(-x)); silu(x) = x / (1 + exp(-x)), as the interpreter computes them.
            let denom = |x: &str| {
                format!(
                    "    %s{i}_n = arith.negf {x} : f32\n    %s{i}_e = math.exp %s{i}_n : f32\n    \
                     %s{i}_d = arith.addf %one, %s{i}_e : f32\n"
                )
            };
            s.push_str(&match step.op {
                EwOp::Add => bin("arith.addf"),
                EwOp::Sub => bin("arith.subf"),
                EwOp::Mul => bin("arith.mulf"),
                EwOp::Div => bin("arith.divf"),
                EwOp::Neg => un("arith.negf"),
                EwOp::Exp => un("math.exp"),
                EwOp::Sqrt => un("math.sqrt"),
                EwOp::Rsqrt => {
                    format!("    %s{i}_r = math.sqrt {} : f32\n    %s{i} = arith.divf %one, %s{i}_r : f32\n", a[0])
                }
                EwOp::Sigmoid => format!("{}    %s{i} = arith.divf %one, %s{i}_d : f32\n", denom(&a[0])),
                EwOp::Silu => format!("{}    %s{i} = arith.divf {}, %s{i}_d : f32\n", denom(&a[0]), a[0]),
                // `ogt` is false for NaN, which becomes 0 as in the interpreter.
                EwOp::Threshold => format!(
                    "    %s{i}_a = math.absf {} : f32\n    %s{i}_c = arith.cmpf ogt, %s{i}_a, {} : f32\n    \
                     %s{i} = arith.select %s{i}_c, {}, %zero : f32\n",
                    a[0], a[1], a[0]
                ),
                // 0.5·x·(1 + tanh(u)) = x − x / (exp(2u) + 1), u = √(2/π)·(x + 0.044715·x³): exp(2u) = inf
                // gives x, 0 gives 0, never a NaN (tanh itself has no lowering to LLVM here).
                EwOp::GeluTanh => format!(
                    "    %s{i}_x2 = arith.mulf {x}, {x} : f32\n    %s{i}_x3 = arith.mulf %s{i}_x2, {x} : f32\n    \
                     %s{i}_ca = arith.constant 0x3D372713 : f32\n    %s{i}_c2 = arith.constant 0x3FCC422A : f32\n    \
                     %s{i}_t = arith.mulf %s{i}_x3, %s{i}_ca : f32\n    %s{i}_in = arith.addf {x}, %s{i}_t : f32\n    \
                     %s{i}_u2 = arith.mulf %s{i}_in, %s{i}_c2 : f32\n    %s{i}_e = math.exp %s{i}_u2 : f32\n    \
                     %s{i}_d = arith.addf %one, %s{i}_e : f32\n    %s{i}_q = arith.divf {x}, %s{i}_d : f32\n    \
                     %s{i} = arith.subf {x}, %s{i}_q : f32\n",
                    x = a[0]
                ),
                EwOp::SwiGlu => format!(
                    "{}    %s{i}_g = arith.divf {}, %s{i}_d : f32\n    %s{i} = arith.mulf %s{i}_g, {} : f32\n",
                    denom(&a[0]),
                    a[0],
                    a[1]
                ),
            });
        }
        let _ = writeln!(s, "    linalg.yield %s{} : f32", self.steps.len() - 1);
        let _ = writeln!(s, "  }}\n  return\n}}");
        s
    }

    /// The uniform-ABI entry point calling the lowered body (already linked into `module`) on rows
    /// `begin..end`: row-indexed buffers are offset to `begin`, and each memref is passed as MLIR's
    /// expanded descriptor (allocated pointer, aligned pointer, offset, sizes…, strides…).
    pub fn wrap<'ctx>(&self, ctx: &'ctx Context, module: &Module<'ctx>) -> R<FunctionValue<'ctx>> {
        let body = module.get_function(&self.body_symbol()).ok_or_else(|| {
            crate::CodegenError::Llvm(format!("lowered MLIR lacks the body `{}`", self.body_symbol()))
        })?;
        let e = Emitter::kernel(ctx, module, &self.symbol())?;
        let rows = e.b.build_int_sub(e.end, e.begin, "rows")?;
        let cols_int = e.i64c(self.cols as i64);
        let (cols, zero, one) = (cols_int, e.i64c(0), e.i64c(1));
        let mut args: Vec<BasicMetadataValueEnum> = Vec::new();
        let (zero, one, cols): (BasicMetadataValueEnum, BasicMetadataValueEnum, BasicMetadataValueEnum) =
            (zero.into(), one.into(), cols.into());
        let rows: BasicMetadataValueEnum = rows.into();
        for (i, &b) in self.inputs.iter().chain([&Bcast::Full]).enumerate() {
            let p = e.buf(i as u64)?;
            match b {
                Bcast::Full => {
                    let p = e.gep(e.f32t().into(), p, e.mul(e.begin, cols_int)?)?;
                    args.extend([p.into(), p.into(), zero, rows, cols, cols, one]);
                }
                Bcast::Row => args.extend([p.into(), p.into(), zero, cols, one]),
                Bcast::Col => {
                    let p = e.gep(e.f32t().into(), p, e.begin)?;
                    args.extend([p.into(), p.into(), zero, rows, one]);
                }
                Bcast::Scalar => args.extend([p.into(), p.into(), zero, one, one]),
            }
        }
        e.b.build_call(body, &args, "")?;
        e.finish()
    }
}
