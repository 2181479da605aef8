//! A thin layer over inkwell for writing kernels: the uniform kernel ABI, counted loops, f32 math.
//!
//! Every kernel has the signature of [`kiln_ir::program`]'s ABI:
//! `void k(i8** bufs, i64* dims, i64 begin, i64 end)`. Accumulators live in entry-block allocas, which
//! LLVM's SROA/mem2reg turn into registers, so loop bodies can stay simple load/store code.

use crate::CodegenError;
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicTypeEnum, FloatType, IntType, PointerType};
use inkwell::values::{BasicMetadataValueEnum, FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};

pub type R<T> = Result<T, CodegenError>;

pub struct Emitter<'a, 'ctx> {
    pub ctx: &'ctx Context,
    pub module: &'a Module<'ctx>,
    pub b: Builder<'ctx>,
    pub func: FunctionValue<'ctx>,
    bufs: PointerValue<'ctx>,
    dims: PointerValue<'ctx>,
    pub begin: IntValue<'ctx>,
    pub end: IntValue<'ctx>,
}

impl<'a, 'ctx> Emitter<'a, 'ctx> {
    /// Starts a kernel with the uniform ABI; the builder is positioned in its entry block.
    pub fn kernel(ctx: &'ctx Context, module: &'a Module<'ctx>, name: &str) -> R<Self> {
        let ptr = ctx.ptr_type(AddressSpace::default());
        let i64t = ctx.i64_type();
        let fty = ctx.void_type().fn_type(&[ptr.into(), ptr.into(), i64t.into(), i64t.into()], false);
        let func = module.add_function(name, fty, Some(Linkage::External));
        for i in 0..2 {
            let a = func.get_nth_param(i).unwrap();
            a.set_name(["bufs", "dims"][i as usize]);
        }
        let entry = ctx.append_basic_block(func, "entry");
        let b = ctx.create_builder();
        b.position_at_end(entry);
        let p = |i: u32| func.get_nth_param(i).unwrap();
        Ok(Emitter {
            ctx,
            module,
            b,
            func,
            bufs: p(0).into_pointer_value(),
            dims: p(1).into_pointer_value(),
            begin: p(2).into_int_value(),
            end: p(3).into_int_value(),
        })
    }

    pub fn f32t(&self) -> FloatType<'ctx> {
        self.ctx.f32_type()
    }
    pub fn i64t(&self) -> IntType<'ctx> {
        self.ctx.i64_type()
    }
    pub fn ptrt(&self) -> PointerType<'ctx> {
        self.ctx.ptr_type(AddressSpace::default())
    }
    pub fn i64c(&self, v: i64) -> IntValue<'ctx> {
        self.i64t().const_int(v as u64, true)
    }
    pub fn f32c(&self, v: f32) -> FloatValue<'ctx> {
        self.f32t().const_float(v as f64)
    }

    /// `bufs[i]`.
    pub fn buf(&self, i: u64) -> R<PointerValue<'ctx>> {
        let slot = self.gep(self.ptrt().into(), self.bufs, self.i64c(i as i64))?;
        Ok(self.b.build_load(self.ptrt(), slot, &format!("buf{i}"))?.into_pointer_value())
    }

    /// `dims[i]`.
    pub fn dim(&self, i: u64) -> R<IntValue<'ctx>> {
        let slot = self.gep(self.i64t().into(), self.dims, self.i64c(i as i64))?;
        Ok(self.b.build_load(self.i64t(), slot, &format!("dim{i}"))?.into_int_value())
    }

    pub fn gep(&self, ty: BasicTypeEnum<'ctx>, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> R<PointerValue<'ctx>> {
        // SAFETY (of the generated code): every index is bounded by the launch's dims, which the runtime
        // derives from the buffers it allocated.
        Ok(unsafe { self.b.build_in_bounds_gep(ty, base, &[idx], "p")? })
    }

    pub fn load_f32(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> R<FloatValue<'ctx>> {
        let p = self.gep(self.f32t().into(), base, idx)?;
        Ok(self.b.build_load(self.f32t(), p, "v")?.into_float_value())
    }

    pub fn store_f32(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>, v: FloatValue<'ctx>) -> R<()> {
        let p = self.gep(self.f32t().into(), base, idx)?;
        self.b.build_store(p, v)?;
        Ok(())
    }

    /// Loads an i32 element and widens it to i64.
    pub fn load_i32_as_i64(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let i32t = self.ctx.i32_type();
        let p = self.gep(i32t.into(), base, idx)?;
        let v = self.b.build_load(i32t, p, "i")?.into_int_value();
        Ok(self.b.build_int_s_extend(v, self.i64t(), "i64")?)
    }

    /// An f32 stack slot in the entry block (promoted to a register by LLVM).
    pub fn var_f32(&self, init: f32) -> R<PointerValue<'ctx>> {
        let entry = self.func.get_first_basic_block().unwrap();
        let tmp = self.ctx.create_builder();
        match entry.get_first_instruction() {
            Some(i) => tmp.position_before(&i),
            None => tmp.position_at_end(entry),
        }
        let slot = tmp.build_alloca(self.f32t(), "acc")?;
        self.b.build_store(slot, self.f32c(init))?;
        Ok(slot)
    }

    /// A fixed-size f32 array in the entry block.
    pub fn array_f32(&self, n: u32) -> R<PointerValue<'ctx>> {
        let entry = self.func.get_first_basic_block().unwrap();
        let tmp = self.ctx.create_builder();
        match entry.get_first_instruction() {
            Some(i) => tmp.position_before(&i),
            None => tmp.position_at_end(entry),
        }
        Ok(tmp.build_alloca(self.f32t().array_type(n), "arr")?)
    }

    /// An f32 array of `n` (a run-time count) elements, allocated once in the entry block: call it
    /// before any loop, while the builder is still in the entry block.
    pub fn array_f32_dyn(&self, n: IntValue<'ctx>) -> R<PointerValue<'ctx>> {
        Ok(self.b.build_array_alloca(self.f32t(), n, "dynarr")?)
    }

    /// An i64 stack slot in the entry block.
    pub fn var_i64(&self, init: i64) -> R<PointerValue<'ctx>> {
        let entry = self.func.get_first_basic_block().unwrap();
        let tmp = self.ctx.create_builder();
        match entry.get_first_instruction() {
            Some(i) => tmp.position_before(&i),
            None => tmp.position_at_end(entry),
        }
        let slot = tmp.build_alloca(self.i64t(), "ivar")?;
        self.b.build_store(slot, self.i64c(init))?;
        Ok(slot)
    }
    pub fn get_i64(&self, slot: PointerValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_load(self.i64t(), slot, "iv")?.into_int_value())
    }
    pub fn set_i64(&self, slot: PointerValue<'ctx>, v: IntValue<'ctx>) -> R<()> {
        self.b.build_store(slot, v)?;
        Ok(())
    }

    /// `if cond { then() } else { otherwise() }`.
    pub fn if_else(
        &self,
        cond: IntValue<'ctx>,
        then: impl FnOnce() -> R<()>,
        otherwise: impl FnOnce() -> R<()>,
    ) -> R<()> {
        let (t, f, join) = (
            self.ctx.append_basic_block(self.func, "then"),
            self.ctx.append_basic_block(self.func, "else"),
            self.ctx.append_basic_block(self.func, "join"),
        );
        self.b.build_conditional_branch(cond, t, f)?;
        self.b.position_at_end(t);
        then()?;
        self.b.build_unconditional_branch(join)?;
        self.b.position_at_end(f);
        otherwise()?;
        self.b.build_unconditional_branch(join)?;
        self.b.position_at_end(join);
        Ok(())
    }

    pub fn if_then(&self, cond: IntValue<'ctx>, then: impl FnOnce() -> R<()>) -> R<()> {
        self.if_else(cond, then, || Ok(()))
    }

    /// Signed integer comparison.
    pub fn icmp(&self, pred: IntPredicate, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_int_compare(pred, a, b, "icmp")?)
    }
    /// Ordered float comparison.
    pub fn fcmp(&self, pred: FloatPredicate, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_float_compare(pred, a, b, "fcmp")?)
    }
    pub fn select_f32(&self, c: IntValue<'ctx>, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self.b.build_select(c, a, b, "sel")?.into_float_value())
    }
    pub fn select_i64(&self, c: IntValue<'ctx>, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_select(c, a, b, "sel")?.into_int_value())
    }
    pub fn imax(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let gt = self.b.build_int_compare(IntPredicate::SGT, a, b, "gt")?;
        Ok(self.b.build_select(gt, a, b, "max")?.into_int_value())
    }
    pub fn isub(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_int_sub(a, b, "sub")?)
    }
    pub fn log(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        self.intrinsic_f32("llvm.log", &[x])
    }

    pub fn get(&self, slot: PointerValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self.b.build_load(self.f32t(), slot, "x")?.into_float_value())
    }
    pub fn set(&self, slot: PointerValue<'ctx>, v: FloatValue<'ctx>) -> R<()> {
        self.b.build_store(slot, v)?;
        Ok(())
    }

    /// `for i in start..end { body(i) }`.
    pub fn for_range(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        mut body: impl FnMut(IntValue<'ctx>) -> R<()>,
    ) -> R<()> {
        let pre = self.b.get_insert_block().unwrap();
        let header = self.ctx.append_basic_block(self.func, "loop");
        let body_bb = self.ctx.append_basic_block(self.func, "body");
        let exit = self.ctx.append_basic_block(self.func, "exit");
        self.b.build_unconditional_branch(header)?;
        self.b.position_at_end(header);
        let phi = self.b.build_phi(self.i64t(), "i")?;
        phi.add_incoming(&[(&start, pre)]);
        let i = phi.as_basic_value().into_int_value();
        let more = self.b.build_int_compare(IntPredicate::SLT, i, end, "more")?;
        self.b.build_conditional_branch(more, body_bb, exit)?;
        self.b.position_at_end(body_bb);
        body(i)?;
        let next = self.b.build_int_add(i, self.i64c(1), "next")?;
        let latch = self.b.get_insert_block().unwrap();
        phi.add_incoming(&[(&next, latch)]);
        self.b.build_unconditional_branch(header)?;
        self.b.position_at_end(exit);
        Ok(())
    }

    pub fn add(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_int_add(a, b, "add")?)
    }
    pub fn mul(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_int_mul(a, b, "mul")?)
    }
    pub fn div(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_int_signed_div(a, b, "div")?)
    }
    pub fn rem(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self.b.build_int_signed_rem(a, b, "rem")?)
    }
    pub fn imin(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let lt = self.b.build_int_compare(IntPredicate::SLT, a, b, "lt")?;
        Ok(self.b.build_select(lt, a, b, "min")?.into_int_value())
    }

    pub fn fadd(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self.b.build_float_add(a, b, "fadd")?)
    }
    pub fn fsub(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self.b.build_float_sub(a, b, "fsub")?)
    }
    pub fn fmul(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self.b.build_float_mul(a, b, "fmul")?)
    }
    pub fn fdiv(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self.b.build_float_div(a, b, "fdiv")?)
    }
    pub fn fmax(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let gt = self.b.build_float_compare(FloatPredicate::OGT, a, b, "gt")?;
        Ok(self.b.build_select(gt, a, b, "max")?.into_float_value())
    }
    pub fn si_to_f32(&self, v: IntValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self.b.build_signed_int_to_float(v, self.f32t(), "f")?)
    }

    /// Calls a unary f32 LLVM intrinsic such as `llvm.exp`, `llvm.sqrt`, `llvm.cos`.
    pub fn intrinsic_f32(&self, name: &str, args: &[FloatValue<'ctx>]) -> R<FloatValue<'ctx>> {
        let intr = Intrinsic::find(name).ok_or_else(|| CodegenError::Llvm(format!("no intrinsic {name}")))?;
        let decl = intr
            .get_declaration(self.module, &[self.f32t().into()])
            .ok_or_else(|| CodegenError::Llvm(format!("cannot declare {name}.f32")))?;
        let args: Vec<BasicMetadataValueEnum> = args.iter().map(|&a| a.into()).collect();
        let v = self.b.build_call(decl, &args, "call")?;
        Ok(v.try_as_basic_value().basic().unwrap().into_float_value())
    }

    /// Calls an i64 LLVM intrinsic such as `llvm.ctpop` or `llvm.cttz` (`args` after the i64 operand:
    /// the intrinsic's own flags).
    pub fn intrinsic_i64(&self, name: &str, args: &[BasicMetadataValueEnum<'ctx>]) -> R<IntValue<'ctx>> {
        let intr = Intrinsic::find(name).ok_or_else(|| CodegenError::Llvm(format!("no intrinsic {name}")))?;
        let decl = intr
            .get_declaration(self.module, &[self.i64t().into()])
            .ok_or_else(|| CodegenError::Llvm(format!("cannot declare {name}.i64")))?;
        let v = self.b.build_call(decl, args, "call")?;
        Ok(v.try_as_basic_value().basic().unwrap().into_int_value())
    }

    pub fn exp(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        self.intrinsic_f32("llvm.exp", &[x])
    }
    pub fn sqrt(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        self.intrinsic_f32("llvm.sqrt", &[x])
    }
    pub fn fma(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>, c: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        self.intrinsic_f32("llvm.fma", &[a, b, c])
    }

    /// `a * b + c` for a reduction: marked reassociable so LLVM may vectorize the sum (the order of a
    /// kernel's additions is then fixed by the generated code, not by the thread count).
    pub fn fma_reduce(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>, c: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        use inkwell::values::{BasicValue, FastMathFlags};
        let v = self.fma(a, b, c)?;
        if let Some(inst) = v.as_instruction_value() {
            inst.set_fast_math_flags(FastMathFlags::AllowReassoc | FastMathFlags::AllowContract)
                .map_err(|e| CodegenError::Llvm(format!("fast-math flags: {e:?}")))?;
        }
        Ok(v)
    }

    /// `<8 x float>` at `base[idx..idx + 8]` (4-byte aligned).
    pub fn load_v8(&self, base: PointerValue<'ctx>, idx: IntValue<'ctx>) -> R<inkwell::values::VectorValue<'ctx>> {
        self.load_vec(base, idx, 8)
    }

    /// `<lanes x float>` at `base[idx..idx + lanes]` (4-byte aligned).
    pub fn load_vec(
        &self,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
        lanes: u32,
    ) -> R<inkwell::values::VectorValue<'ctx>> {
        use inkwell::values::BasicValue;
        let p = self.gep(self.f32t().into(), base, idx)?;
        let v = self.b.build_load(self.f32t().vec_type(lanes), p, "vec")?;
        v.as_instruction_value().unwrap().set_alignment(4).map_err(|e| CodegenError::Llvm(format!("{e:?}")))?;
        Ok(v.into_vector_value())
    }

    pub fn store_v8(
        &self,
        base: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
        v: inkwell::values::VectorValue<'ctx>,
    ) -> R<()> {
        let p = self.gep(self.f32t().into(), base, idx)?;
        self.b.build_store(p, v)?.set_alignment(4).map_err(|e| CodegenError::Llvm(format!("{e:?}")))?;
        Ok(())
    }

    pub fn splat_v8(&self, x: FloatValue<'ctx>) -> R<inkwell::values::VectorValue<'ctx>> {
        let undef = self.f32t().vec_type(8).get_undef();
        let v = self.b.build_insert_element(undef, x, self.i64c(0), "ins")?;
        let zeros = self.ctx.i32_type().vec_type(8).const_zero();
        Ok(self.b.build_shuffle_vector(v, undef, zeros, "splat")?)
    }

    /// `a * b + c` on `<8 x float>` (`llvm.fmuladd`: an FMA where the CPU has one).
    pub fn fma_v8(
        &self,
        a: inkwell::values::VectorValue<'ctx>,
        b: inkwell::values::VectorValue<'ctx>,
        c: inkwell::values::VectorValue<'ctx>,
    ) -> R<inkwell::values::VectorValue<'ctx>> {
        let vt = self.f32t().vec_type(8);
        let intr = Intrinsic::find("llvm.fmuladd").ok_or_else(|| CodegenError::Llvm("no llvm.fmuladd".into()))?;
        let decl = intr
            .get_declaration(self.module, &[vt.into()])
            .ok_or_else(|| CodegenError::Llvm("cannot declare llvm.fmuladd.v8f32".into()))?;
        let v = self.b.build_call(decl, &[a.into(), b.into(), c.into()], "fma8")?;
        Ok(v.try_as_basic_value().basic().unwrap().into_vector_value())
    }

    /// Sum of the lanes (reassociated: a tree, fixed by the generated code).
    pub fn reduce_v8(&self, v: inkwell::values::VectorValue<'ctx>) -> R<FloatValue<'ctx>> {
        use inkwell::values::{BasicValue, FastMathFlags};
        let vt = self.f32t().vec_type(8);
        let intr = Intrinsic::find("llvm.vector.reduce.fadd")
            .ok_or_else(|| CodegenError::Llvm("no llvm.vector.reduce.fadd".into()))?;
        let decl = intr
            .get_declaration(self.module, &[vt.into()])
            .ok_or_else(|| CodegenError::Llvm("cannot declare llvm.vector.reduce.fadd.v8f32".into()))?;
        let r = self.b.build_call(decl, &[self.f32c(0.0).into(), v.into()], "sum")?;
        let r = r.try_as_basic_value().basic().unwrap();
        if let Some(inst) = r.as_instruction_value() {
            inst.set_fast_math_flags(FastMathFlags::AllowReassoc)
                .map_err(|e| CodegenError::Llvm(format!("fast-math flags: {e:?}")))?;
        }
        Ok(r.into_float_value())
    }

    pub fn finish(self) -> R<FunctionValue<'ctx>> {
        self.b.build_return(None)?;
        if !self.func.verify(false) {
            return Err(CodegenError::Llvm(format!(
                "generated kernel {} is invalid",
                self.func.get_name().to_string_lossy()
            )));
        }
        Ok(self.func)
    }
}

impl<'ctx> Emitter<'_, 'ctx> {
    /// Calls an f64 LLVM intrinsic (`llvm.cos`, `llvm.sin`).
    pub fn intrinsic_f64(
        &self,
        name: &str,
        x: inkwell::values::FloatValue<'ctx>,
    ) -> R<inkwell::values::FloatValue<'ctx>> {
        let f64t = self.ctx.f64_type();
        let intr = Intrinsic::find(name).ok_or_else(|| CodegenError::Llvm(format!("no intrinsic {name}")))?;
        let decl = intr
            .get_declaration(self.module, &[f64t.into()])
            .ok_or_else(|| CodegenError::Llvm(format!("cannot declare {name}.f64")))?;
        let v = self.b.build_call(decl, &[x.into()], "call")?;
        Ok(v.try_as_basic_value().basic().unwrap().into_float_value())
    }

    /// A private constant global array of f64 values; returns a pointer to its first element.
    pub fn const_f64_array(&self, name: &str, values: &[f64]) -> PointerValue<'ctx> {
        let f64t = self.ctx.f64_type();
        let consts: Vec<_> = values.iter().map(|&v| f64t.const_float(v)).collect();
        let arr = f64t.const_array(&consts);
        let g = self.module.add_global(f64t.array_type(values.len() as u32), None, name);
        g.set_initializer(&arr);
        g.set_constant(true);
        g.set_linkage(Linkage::Private);
        g.as_pointer_value()
    }
}
