//! Embedding lookup: gathers rows of a (possibly block-quantized) table by token id, dequantizing each
//! row into f32. One row per token, so plain scalar code is enough; the layouts are those of
//! `kiln_ir::quant` (verified against gguf-py).

use super::emit::{Emitter, R};
use crate::CodegenError;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValue, FloatValue, FunctionValue, IntValue, PointerValue};
use kiln_ir::DType;

/// Emits `symbol`: bufs [table, ids(i32), y]; items: tokens; y[t] = dequant(table[ids[t]]).
pub fn emit_embedding<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    dtype: DType,
    d: usize,
    symbol: &str,
) -> R<FunctionValue<'ctx>> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0) {
        return Err(CodegenError::UnsupportedDType { kernel: "embedding", dtype });
    }
    let row_bytes =
        dtype.row_bytes(d).ok_or_else(|| CodegenError::InvalidSpec(format!("embedding width {d} for {dtype}")))?;
    let e = Emitter::kernel(ctx, module, symbol)?;
    let (table, ids, y) = (e.buf(0)?, e.buf(1)?, e.buf(2)?);
    let i8t = ctx.i8_type();
    e.for_range(e.begin, e.end, |t| {
        let id = e.load_i32_as_i64(ids, t)?;
        let row = e.gep(i8t.into(), table, e.mul(id, e.i64c(row_bytes as i64))?)?;
        let out = e.mul(t, e.i64c(d as i64))?;
        let put = |j: IntValue<'ctx>, v: FloatValue<'ctx>| e.store_f32(y, e.add(out, j)?, v);
        match dtype {
            DType::F32 => e.for_range(e.i64c(0), e.i64c(d as i64), |j| put(j, e.load_f32(row, j)?)),
            DType::F16 | DType::BF16 => e.for_range(e.i64c(0), e.i64c(d as i64), |j| {
                let p = e.gep(ctx.i16_type().into(), row, j)?;
                put(j, half_at(&e, p, dtype == DType::BF16)?)
            }),
            _ => {
                let bs = dtype.type_size() as i64;
                e.for_range(e.i64c(0), e.i64c((d / 32) as i64), |blk| {
                    let base = e.gep(i8t.into(), row, e.mul(blk, e.i64c(bs))?)?;
                    let scale = half_at(&e, base, false)?;
                    let first = e.mul(blk, e.i64c(32))?;
                    let byte = |off: i64, j: IntValue<'ctx>| -> R<IntValue<'ctx>> {
                        let p = e.gep(i8t.into(), base, e.add(j, e.i64c(off))?)?;
                        let v = e.b.build_load(i8t, p, "q")?.into_int_value();
                        Ok(e.b.build_int_z_extend(v, e.i64t(), "qz")?)
                    };
                    match dtype {
                        DType::Q8_0 => e.for_range(e.i64c(0), e.i64c(32), |j| {
                            let p = e.gep(i8t.into(), base, e.add(j, e.i64c(2))?)?;
                            let q = e.b.build_load(i8t, p, "q")?.into_int_value();
                            let q = e.b.build_int_s_extend(q, e.i64t(), "qs")?;
                            put(e.add(first, j)?, e.fmul(scale, e.si_to_f32(q)?)?)
                        }),
                        DType::Q4_0 | DType::Q4_1 => {
                            let (qoff, min) = if dtype == DType::Q4_1 {
                                (4, Some(half_at(&e, e.gep(i8t.into(), base, e.i64c(2))?, false)?))
                            } else {
                                (2, None)
                            };
                            e.for_range(e.i64c(0), e.i64c(16), |j| {
                                let q = byte(qoff, j)?;
                                let lo = e.b.build_and(q, e.i64c(15), "lo")?;
                                let hi = e.b.build_right_shift(q, e.i64c(4), false, "hi")?;
                                for (v, at) in [(lo, j), (hi, e.add(j, e.i64c(16))?)] {
                                    let val = match min {
                                        Some(m) => e.fma(e.si_to_f32(v)?, scale, m)?,
                                        None => e.fmul(e.si_to_f32(e.b.build_int_sub(v, e.i64c(8), "c")?)?, scale)?,
                                    };
                                    put(e.add(first, at)?, val)?;
                                }
                                Ok(())
                            })
                        }
                        DType::Q5_0 => {
                            let qh_p = e.gep(i8t.into(), base, e.i64c(2))?;
                            let qh = e.b.build_load(ctx.i32_type(), qh_p, "qh")?;
                            qh.as_instruction_value()
                                .unwrap()
                                .set_alignment(1)
                                .map_err(|m| CodegenError::Llvm(format!("{m:?}")))?;
                            let qh = e.b.build_int_z_extend(qh.into_int_value(), e.i64t(), "qh64")?;
                            e.for_range(e.i64c(0), e.i64c(16), |j| {
                                let q = byte(6, j)?;
                                let h0 = e.b.build_and(
                                    e.b.build_left_shift(e.b.build_right_shift(qh, j, false, "s")?, e.i64c(4), "h")?,
                                    e.i64c(0x10),
                                    "h0",
                                )?;
                                let h1 = e.b.build_and(
                                    e.b.build_right_shift(qh, e.add(j, e.i64c(12))?, false, "s")?,
                                    e.i64c(0x10),
                                    "h1",
                                )?;
                                let lo = e.b.build_or(e.b.build_and(q, e.i64c(15), "lo")?, h0, "x0")?;
                                let hi = e.b.build_or(e.b.build_right_shift(q, e.i64c(4), false, "hi")?, h1, "x1")?;
                                for (v, at) in [(lo, j), (hi, e.add(j, e.i64c(16))?)] {
                                    let c = e.b.build_int_sub(v, e.i64c(16), "c")?;
                                    put(e.add(first, at)?, e.fmul(e.si_to_f32(c)?, scale)?)?;
                                }
                                Ok(())
                            })
                        }
                        _ => unreachable!("checked above"),
                    }
                })
            }
        }
    })?;
    e.finish()
}

/// Loads an f16 (or bf16) at a possibly unaligned byte address and widens it to f32.
fn half_at<'ctx>(e: &Emitter<'_, 'ctx>, p: PointerValue<'ctx>, bf16: bool) -> R<FloatValue<'ctx>> {
    let ty: BasicTypeEnum = if bf16 { e.ctx.bf16_type().into() } else { e.ctx.f16_type().into() };
    let v = e.b.build_load(ty, p, "h")?;
    v.as_instruction_value().unwrap().set_alignment(1).map_err(|m| CodegenError::Llvm(format!("{m:?}")))?;
    Ok(e.b.build_float_ext(v.into_float_value(), e.f32t(), "hf")?)
}
