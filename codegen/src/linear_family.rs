//! The linear family as one kernel with a descriptor: `y = x · Wᵀ` in every form a pass produces —
//! dense, output-masked (CHESS's up/gate), CoreInfer's core rows, input-sparse on a transposed weight
//! (CHESS's down, column-major and gathered layouts), block-sparse, N:M, bitmap — each described by its
//! weight form × input sparsity × output form × epilogue instead of a kernel variant per technique.
//!
//! Lowering builds a [`LinearDesc`] per linear launch; a target implements the family once, by
//! descriptor (`crate::cpu` sends each to its generator), and refuses the combinations it has no code
//! for with [`LinearDesc::describe`] in the message. The symbol of a descriptor is the one the CPU
//! kernels have always had, so programs and artifacts are unchanged.

use kiln_ir::DType;
use serde::{Deserialize, Serialize};

/// How the weight is laid out and, for the compact forms, which layout each phase reads (`decode`:
/// m < 8 rows, `prefill`: m ≥ 8; `false` reads the dense layout the op also carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "snake_case")]
pub enum WeightForm {
    /// Row-major `[n, k]` blocks of `dtype` (with [`InputForm::ActiveChannels`]: the transposed `[k, n]`,
    /// row-major, column-major `…c` or gathered `…g` by dtype).
    Dense,
    /// 32-element blocks in CSR (`kiln_ir::sparse`) beside the dense layout.
    BlockSparse { decode: bool, prefill: bool },
    /// `keep` of every `group` consecutive weights (`kiln_ir::sparse::nm`).
    Nm { keep: usize, group: usize, decode: bool, prefill: bool },
    /// `kept` weights of every row in runs of `gran` (`kiln_ir::sparse::bitmap`).
    Bitmap { gran: usize, kept: usize, decode: bool, prefill: bool },
}

/// Which input channels the kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum InputForm {
    /// All of them.
    Dense,
    /// Only the non-zero ones (activation sparsity), on a transposed weight of `n` columns.
    ActiveChannels { n: usize },
}

/// Which outputs the kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputForm {
    /// Every output.
    All,
    /// Those a mask operand keeps (0 elsewhere).
    Masked,
    /// CoreInfer's core rows, from a per-prompt gathered copy of the weight.
    CoreRows,
}

/// What is added to the result in the same pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Epilogue {
    None,
    /// `+ r`: the residual add after a projection.
    Residual,
}

/// One linear-family kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearDesc {
    /// The weight's element type as stored.
    pub dtype: DType,
    /// The input width.
    pub k: usize,
    pub weight: WeightForm,
    pub input: InputForm,
    pub output: OutputForm,
    pub epilogue: Epilogue,
    /// Dense linears reading the same x in one launch (Q/K/V, gate/up).
    pub group: usize,
}

impl LinearDesc {
    /// The plain dense linear.
    pub fn dense(dtype: DType, k: usize) -> LinearDesc {
        LinearDesc {
            dtype,
            k,
            weight: WeightForm::Dense,
            input: InputForm::Dense,
            output: OutputForm::All,
            epilogue: Epilogue::None,
            group: 1,
        }
    }

    pub fn with_weight(self, weight: WeightForm) -> LinearDesc {
        LinearDesc { weight, ..self }
    }

    pub fn with_input(self, input: InputForm) -> LinearDesc {
        LinearDesc { input, ..self }
    }

    pub fn with_output(self, output: OutputForm) -> LinearDesc {
        LinearDesc { output, ..self }
    }

    pub fn with_epilogue(self, epilogue: Epilogue) -> LinearDesc {
        LinearDesc { epilogue, ..self }
    }

    pub fn grouped(self, group: usize) -> LinearDesc {
        LinearDesc { group, ..self }
    }

    /// Dense weights, dense input, every output: the form a residual epilogue or a group can join.
    pub fn is_plain(&self) -> bool {
        self.weight == WeightForm::Dense && self.input == InputForm::Dense && self.output == OutputForm::All
    }

    /// A descriptor lowering may produce: the forms combine only as the passes make them (one of the
    /// weight, input and output forms differs from dense; grouping and the residual epilogue only on the
    /// plain form, not both).
    pub fn validate(&self) -> Result<(), String> {
        let special =
            [self.weight != WeightForm::Dense, self.input != InputForm::Dense, self.output != OutputForm::All]
                .iter()
                .filter(|&&s| s)
                .count();
        if special > 1 {
            return Err(format!(
                "{}: at most one of the weight, input and output forms may be sparse",
                self.describe()
            ));
        }
        if self.group == 0 || (self.group > 1 && (!self.is_plain() || self.epilogue != Epilogue::None)) {
            return Err(format!("{}: only plain linears without an epilogue are grouped", self.describe()));
        }
        if self.epilogue != Epilogue::None && !self.is_plain() {
            return Err(format!("{}: a residual epilogue needs the plain form", self.describe()));
        }
        Ok(())
    }

    /// Human-readable: `linear q4_1 k=576 weight=nm(2:4, decode) input=dense output=all +residual ×3`.
    pub fn describe(&self) -> String {
        let phases = |d: bool, p: bool| match (d, p) {
            (true, true) => "both phases".to_string(),
            (true, false) => "decode".to_string(),
            (false, true) => "prefill".to_string(),
            (false, false) => "dense layout only".to_string(),
        };
        let weight = match self.weight {
            WeightForm::Dense => "dense".to_string(),
            WeightForm::BlockSparse { decode, prefill } => format!("block-sparse({})", phases(decode, prefill)),
            WeightForm::Nm { keep, group, decode, prefill } => {
                format!("nm({keep}:{group}, {})", phases(decode, prefill))
            }
            WeightForm::Bitmap { gran, kept, decode, prefill } => {
                format!("bitmap(1x{gran}, {kept} kept, {})", phases(decode, prefill))
            }
        };
        let input = match self.input {
            InputForm::Dense => "dense".to_string(),
            InputForm::ActiveChannels { n } => format!("active-channels(n={n})"),
        };
        let output = match self.output {
            OutputForm::All => "all",
            OutputForm::Masked => "masked",
            OutputForm::CoreRows => "core-rows",
        };
        let mut s = format!("linear {} k={} weight={weight} input={input} output={output}", self.dtype.name(), self.k);
        if self.epilogue == Epilogue::Residual {
            s.push_str(" +residual");
        }
        if self.group > 1 {
            s.push_str(&format!(" ×{}", self.group));
        }
        s
    }

    /// The symbol the program calls (the uniform-ABI entry point).
    pub fn symbol(&self) -> String {
        let (dtype, k) = (self.dtype, self.k);
        match (self.weight, self.input, self.output) {
            (WeightForm::Dense, InputForm::Dense, OutputForm::All) => {
                let inner = crate::kernels::linear::LinearKernelSpec {
                    dtype,
                    k,
                    residual: self.epilogue == Epilogue::Residual,
                };
                format!("{}_x{}", inner.symbol(), self.group)
            }
            (_, _, OutputForm::Masked) => format!("kiln_masked_linear_{}_k{k}", dtype.name()),
            (_, _, OutputForm::CoreRows) => format!("kiln_core_linear_{}_k{k}", dtype.name()),
            (_, InputForm::ActiveChannels { n }, _) => {
                format!("{}_k{k}_x", crate::kernels::sparse::ActiveLinearKernelSpec::new(dtype, n).symbol())
            }
            (WeightForm::BlockSparse { decode, prefill }, ..) => {
                format!("kiln_pruned_linear_{}_k{k}_d{}p{}", dtype.name(), decode as u8, prefill as u8)
            }
            (WeightForm::Nm { keep, group, decode, prefill }, ..) => {
                let nm = crate::kernels::nm::NmLinearKernelSpec::new(dtype, nm_pattern(keep, group), k);
                format!("{}{}", nm.symbol(), phase_suffix(decode, prefill))
            }
            (WeightForm::Bitmap { gran, kept, decode, prefill }, ..) => {
                let bm = crate::kernels::bitmap::BitmapLinearKernelSpec::new(dtype, gran, kept, k);
                format!("{}{}", bm.symbol(), phase_suffix(decode, prefill))
            }
        }
    }
}

/// The wrapper suffix of an N:M or bitmap linear: `_x1` (the compact kernel in both phases, wrapped like
/// one dense linear) or `_d<decode>p<prefill>` (which phase reads the compact form, 1, or the dense
/// layout, 0).
fn phase_suffix(decode: bool, prefill: bool) -> String {
    if decode && prefill {
        "_x1".into()
    } else {
        format!("_d{}p{}", decode as u8, prefill as u8)
    }
}

/// The pattern of an N:M descriptor (checked when the op was lowered).
pub(crate) fn nm_pattern(keep: usize, group: usize) -> kiln_ir::sparse::NmPattern {
    kiln_ir::sparse::NmPattern { keep, group }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_the_cpu_kernels_names() {
        let d = LinearDesc::dense(DType::Q4_1, 576);
        assert_eq!(d.symbol(), "kiln_linear_q4_1_k576_x1");
        assert_eq!(d.clone().grouped(3).symbol(), "kiln_linear_q4_1_k576_x3");
        assert!(d.clone().with_epilogue(Epilogue::Residual).symbol().ends_with("_x1"));
        assert_ne!(d.clone().with_epilogue(Epilogue::Residual).symbol(), d.symbol());
        assert_eq!(d.clone().with_output(OutputForm::Masked).symbol(), "kiln_masked_linear_q4_1_k576");
        let bs = d.clone().with_weight(WeightForm::BlockSparse { decode: true, prefill: false });
        assert_eq!(bs.symbol(), "kiln_pruned_linear_q4_1_k576_d1p0");
        let nm = |d: bool, p: bool| {
            LinearDesc::dense(DType::F32, 64).with_weight(WeightForm::Nm { keep: 2, group: 4, decode: d, prefill: p })
        };
        assert!(nm(true, true).symbol().ends_with("_x1"));
        assert!(nm(true, false).symbol().ends_with("_d1p0"));
    }

    #[test]
    fn only_the_combinations_passes_make_validate() {
        let d = LinearDesc::dense(DType::Q8_0, 64);
        assert!(d.validate().is_ok());
        assert!(d.clone().grouped(3).validate().is_ok());
        assert!(d.clone().with_epilogue(Epilogue::Residual).validate().is_ok());
        let masked_active = d.clone().with_output(OutputForm::Masked).with_input(InputForm::ActiveChannels { n: 32 });
        let err = masked_active.validate().unwrap_err();
        assert!(err.contains("input=active-channels(n=32) output=masked"), "{err}");
        assert!(d.clone().with_output(OutputForm::CoreRows).grouped(2).validate().is_err());
        assert!(d.clone().with_output(OutputForm::Masked).with_epilogue(Epilogue::Residual).validate().is_err());
        assert!(d.grouped(0).validate().is_err());
    }
}
