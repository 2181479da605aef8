//! Element types of IR values and weights, including GGUF's block-quantized formats.
//!
//! A block-quantized type stores `block_size()` elements in `type_size()` bytes; a row of `n` elements
//! of such a type takes `row_bytes(n)` bytes and `n` must be a multiple of the block size. The numeric
//! ids are ggml's (`ggml_type`), so the GGUF reader and writer map them one to one.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Number of elements in a "K-quant" super-block.
pub const QK_K: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// Column-major ("exact transposed") Q4_0 / Q4_1 / Q8_0: a `[K, N]` tensor holding `Wᵀ` of a
    /// `[N, K]` weight in the block format, with the weight's own codes and scales (no requantization)
    /// laid out so that an input channel `j` is one contiguous row of `N` codes. Derived weights of
    /// `active_linear` only (not in GGUF, not read by any other op); see [`crate::column`].
    Q4_0C,
    Q4_1C,
    Q8_0C,
    /// Gathered column-major Q4_0 / Q4_1 / Q8_0: some channels (rows) of a column-major weight, with
    /// only the scales of the 32-channel blocks they came from; a `[K', N]` tensor whose byte size
    /// depends on how many source blocks the kept channels touch (structured pruning's `W_down`/`W_o`,
    /// `active_linear` only); see [`crate::column`] (`gather`).
    Q4_0G,
    Q4_1G,
    Q8_0G,
}

impl DType {
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];

    /// The name used in IR text and diagnostics (ggml's spelling, lower case).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q8_0 => "q8_0",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
            DType::Q4_0C => "q4_0c",
            DType::Q4_1C => "q4_1c",
            DType::Q8_0C => "q8_0c",
            DType::Q4_0G => "q4_0g",
            DType::Q4_1G => "q4_1g",
            DType::Q8_0G => "q8_0g",
        }
    }

    /// ggml's `enum ggml_type` value.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::I32 => 26,
            DType::I64 => 27,
            DType::BF16 => 30,
            // Not ggml types: ids outside ggml's range, which `from_ggml_id` never returns.
            DType::Q4_0C => 0x4b00_0002,
            DType::Q4_1C => 0x4b00_0003,
            DType::Q8_0C => 0x4b00_0008,
            DType::Q4_0G => 0x4b01_0002,
            DType::Q4_1G => 0x4b01_0003,
            DType::Q8_0G => 0x4b01_0008,
        }
    }

    pub fn from_ggml_id(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.ggml_id() == id)
    }

    /// ggml's name for a type id Kiln does not support, for error messages.
    pub fn ggml_name_of_unsupported(id: u32) -> &'static str {
        match id {
            4 | 5 => "Q4_2/Q4_3 (removed)",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            15 => "Q8_K",
            16..=23 => "IQ*",
            24 => "I8",
            25 => "I16",
            28 => "F64",
            29 => "IQ1_M",
            _ => "unknown",
        }
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::I32 | DType::I64 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q4_0C | DType::Q4_1C | DType::Q8_0C => 32,
            DType::Q4_0G | DType::Q4_1G | DType::Q8_0G => 32,
            DType::Q4K | DType::Q5K | DType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::Q4_0 => 2 + 16,
            DType::Q4_1 => 2 + 2 + 16,
            DType::Q5_0 => 2 + 4 + 16,
            DType::Q5_1 => 2 + 2 + 4 + 16,
            DType::Q8_0 => 2 + 32,
            DType::Q4K => 2 + 2 + 12 + QK_K / 2,
            DType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            DType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            // The same bytes per 32 elements as the row-major format, split into codes and scales.
            DType::Q4_0C | DType::Q4_1C | DType::Q8_0C => self.column_base().expect("column").type_size(),
            // Not exact for a gathered tensor (its scales depend on the source blocks kept: its byte
            // size comes from its data, `column::gathered_len`); the codes and one scale set per 32.
            DType::Q4_0G | DType::Q4_1G | DType::Q8_0G => self.column_layout().expect("gathered").type_size(),
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Element types an op may read as floats. The column-major formats are not among them: only
    /// `active_linear` reads those (see [`DType::is_column`]).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
            || (self.is_quantized() && !self.is_column() && !self.is_gathered())
    }

    /// The column-major formats (`q4_0c`, `q4_1c`, `q8_0c`).
    pub const COLUMN: [DType; 3] = [DType::Q4_0C, DType::Q4_1C, DType::Q8_0C];

    pub fn is_column(self) -> bool {
        self.column_base().is_some()
    }

    /// The row-major block format a column-major one stores (`q4_1c` → `q4_1`).
    pub fn column_base(self) -> Option<DType> {
        match self {
            DType::Q4_0C => Some(DType::Q4_0),
            DType::Q4_1C => Some(DType::Q4_1),
            DType::Q8_0C => Some(DType::Q8_0),
            _ => None,
        }
    }

    /// The column-major format of a row-major block format, where there is one.
    pub fn column_of(self) -> Option<DType> {
        DType::COLUMN.into_iter().find(|c| c.column_base() == Some(self))
    }

    /// The gathered column formats (`q4_0g`, `q4_1g`, `q8_0g`).
    pub const GATHERED: [DType; 3] = [DType::Q4_0G, DType::Q4_1G, DType::Q8_0G];

    pub fn is_gathered(self) -> bool {
        DType::GATHERED.contains(&self)
    }

    /// The column-major format whose codes and scales a column or gathered format holds (`q4_1g` →
    /// `q4_1c`, `q4_1c` → itself).
    pub fn column_layout(self) -> Option<DType> {
        match self {
            DType::Q4_0G => Some(DType::Q4_0C),
            DType::Q4_1G => Some(DType::Q4_1C),
            DType::Q8_0G => Some(DType::Q8_0C),
            c if c.is_column() => Some(c),
            _ => None,
        }
    }

    /// The gathered format of a row-major block format (`q4_1` → `q4_1g`), where there is one.
    pub fn gathered_of(self) -> Option<DType> {
        let c = self.column_of()?;
        DType::GATHERED.into_iter().find(|g| g.column_layout() == Some(c))
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }

    /// Bytes taken by a row of `n` elements, or `None` when `n` is not a whole number of blocks or the
    /// size overflows.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DType::ALL
            .into_iter()
            .chain(DType::COLUMN)
            .chain(DType::GATHERED)
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown dtype `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
            assert_eq!(DType::from_ggml_id(d.ggml_id()), Some(d));
        }
    }

    #[test]
    fn block_sizes_match_ggml() {
        // Sizes from ggml's block_* struct definitions.
        assert_eq!(DType::Q4_0.type_size(), 18);
        assert_eq!(DType::Q4_1.type_size(), 20);
        assert_eq!(DType::Q5_0.type_size(), 22);
        assert_eq!(DType::Q5_1.type_size(), 24);
        assert_eq!(DType::Q8_0.type_size(), 34);
        assert_eq!(DType::Q4K.type_size(), 144);
        assert_eq!(DType::Q5K.type_size(), 176);
        assert_eq!(DType::Q6K.type_size(), 210);
        assert_eq!(DType::Q4_1.row_bytes(64), Some(40));
        assert_eq!(DType::Q4_1.row_bytes(33), None);
    }

    #[test]
    fn column_formats_name_their_base() {
        for c in DType::COLUMN {
            assert_eq!(c.name().parse::<DType>().unwrap(), c);
            let base = c.column_base().unwrap();
            assert_eq!(base.column_of(), Some(c));
            assert_eq!(c.type_size(), base.type_size());
            assert!(c.is_quantized() && !c.is_float() && base.is_float());
            assert_eq!(DType::from_ggml_id(c.ggml_id()), None, "{c} is not a GGUF type");
        }
        assert_eq!(DType::Q5_1.column_of(), None);
        for (base, g) in [DType::Q4_0, DType::Q4_1, DType::Q8_0].into_iter().zip(DType::GATHERED) {
            assert_eq!(g.name().parse::<DType>().unwrap(), g);
            assert_eq!(base.gathered_of(), Some(g));
            assert_eq!(g.column_layout(), base.column_of());
            assert!(g.is_gathered() && !g.is_column() && !g.is_float());
            assert_eq!(DType::from_ggml_id(g.ggml_id()), None, "{g} is not a GGUF type");
        }
        assert_eq!(DType::Q5_1.gathered_of(), None);
    }
}
