//! CPU matrix products that read quantized weights as 4 or 8 bits per value, never
//! materialising an f32 copy of the weight.
//!
//! A batch-1 decoding step is bound by memory bandwidth: every weight is read once per new
//! token. Multiplying a dense f32 copy streams 32 bits per weight; these kernels stream the
//! stored codes (4 or 8 bits, plus one f32 scale per 32 values) and turn them into f32 in
//! registers. The activations stay f32, so a product differs from the one with the decoded weight
//! only by the order of the additions (about 1e-6 relative), not by any rounding of the
//! activations: greedy generations and likelihoods are the f32 path's.
//!
//! # Layout
//!
//! Every supported format is repacked once, at load, into one of two layouts ([`PackedWeight`]):
//!
//! * 4-bit ([`Codes::Nibbles`]): per block of 32 values of a row, 16 bytes; value `j` in the low
//!   nibble of byte `j`, value `j + 16` in its high nibble (ggml's q4 order), so that the low and
//!   the high nibbles of a block each line up with 16 consecutive activations. A code becomes a
//!   value through a 16-entry table, then `scale · table[code] + offset`: q4_0 (table −8..7, no
//!   offset), q4_1 (table 0..15, offset = the block's min), q4_K (table 0..15; each 32 values of
//!   a 256-value super-block get scale `d·scale_j` and offset `−dmin·min_j` from its 6-bit
//!   scales and minimums, see [`GgmlBlocks::Q4K`]) and NF4 (QLoRA's table, scale = the block's
//!   absmax, decoded from its double quantization once).
//! * 8-bit ([`Codes::Bytes`]): one `i8` per value, `scale · code` (q8_0).
//!
//! # Kernels
//!
//! One output row at a time against a tile of up to [`TILE`] activation rows, so that each
//! weight block is decoded once per tile and used for every row of it (batched decoding and
//! prefill reuse the decoded weight from registers). Output rows are spread over the kernels'
//! threads (`team.rs`: the caller and helpers that stay awake between products). The
//! instruction set is chosen at run time ([`Isa::detect`]): AVX-512F (a 16-entry table is one
//! `vpermps`), AVX2 + FMA, or portable scalar code; all three compute the same values up to the
//! order of additions, which the tests check.

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::team::Team;
use std::sync::OnceLock;

/// Values per block: one scale (and offset) each.
pub const BLOCK: usize = 32;
/// Activation rows processed against one decoded weight block.
pub const TILE: usize = 8;

/// The stored codes of a [`PackedWeight`].
#[derive(Debug, Clone)]
pub enum Codes {
    /// Two 4-bit codes per byte, 16 bytes per block of 32 values (see the module docs for the
    /// order), mapped through `table`.
    Nibbles {
        /// `rows · cols / 2` bytes.
        bytes: Vec<u8>,
        /// The value of each code before scaling.
        table: [f32; 16],
    },
    /// One signed byte per value.
    Bytes(Vec<i8>),
}

/// A frozen `[rows, cols]` weight in a kernel layout: codes, one scale per block of
/// [`BLOCK`] values and, for affine formats, one offset per block.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    rows: usize,
    cols: usize,
    codes: Codes,
    scales: Vec<f32>,
    offsets: Option<Vec<f32>>,
}

/// Why a weight cannot be packed, or a row cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The row length is not a whole number of blocks.
    #[error("rows of {cols} values are not a whole number of {block}-value blocks")]
    Ragged {
        /// Values per row.
        cols: usize,
        /// The format's block size.
        block: usize,
    },
    /// A row index past the last row.
    #[error("row {row} is out of range for a weight of {rows} rows")]
    Row {
        /// The requested row.
        row: usize,
        /// Rows of the weight.
        rows: usize,
    },
    /// The byte or scale counts do not match the shape.
    #[error("{what}: expected {expected}, found {found}")]
    Size {
        /// Which part.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
}

fn check(what: &'static str, expected: usize, found: usize) -> Result<(), PackError> {
    if expected == found {
        Ok(())
    } else {
        Err(PackError::Size {
            what,
            expected,
            found,
        })
    }
}

fn f16(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

impl PackedWeight {
    /// From ggml blocks of `kind` (`data` as stored: `rows · cols / 32` blocks, row-major).
    pub fn from_ggml(
        kind: GgmlBlocks,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<Self, PackError> {
        let format_block = kind.block_values();
        if cols == 0 || !cols.is_multiple_of(format_block) {
            return Err(PackError::Ragged {
                cols,
                block: format_block,
            });
        }
        let blocks = rows * cols / BLOCK;
        let block_bytes = kind.block_bytes();
        check(
            "ggml block bytes",
            rows * cols / format_block * block_bytes,
            data.len(),
        )?;
        let mut scales = Vec::with_capacity(blocks);
        let weight = match kind {
            GgmlBlocks::Q4_0 | GgmlBlocks::Q4_1 => {
                let affine = kind == GgmlBlocks::Q4_1;
                let mut bytes = Vec::with_capacity(blocks * 16);
                let mut offsets = Vec::with_capacity(if affine { blocks } else { 0 });
                for block in data.chunks_exact(block_bytes) {
                    scales.push(f16(block, 0));
                    let qs = if affine {
                        offsets.push(f16(block, 2));
                        &block[4..20]
                    } else {
                        &block[2..18]
                    };
                    bytes.extend_from_slice(qs);
                }
                let table = if affine {
                    std::array::from_fn(|i| i as f32)
                } else {
                    std::array::from_fn(|i| i as f32 - 8.0)
                };
                PackedWeight {
                    rows,
                    cols,
                    codes: Codes::Nibbles { bytes, table },
                    scales,
                    offsets: affine.then_some(offsets),
                }
            }
            GgmlBlocks::Q4K => {
                let mut bytes = Vec::with_capacity(blocks * 16);
                let mut offsets = Vec::with_capacity(blocks);
                for block in data.chunks_exact(block_bytes) {
                    q4k_super_block(block, &mut bytes, &mut scales, &mut offsets);
                }
                PackedWeight {
                    rows,
                    cols,
                    codes: Codes::Nibbles {
                        bytes,
                        table: std::array::from_fn(|i| i as f32),
                    },
                    scales,
                    offsets: Some(offsets),
                }
            }
            GgmlBlocks::Q8_0 => {
                let mut codes = Vec::with_capacity(blocks * BLOCK);
                for block in data.chunks_exact(block_bytes) {
                    scales.push(f16(block, 0));
                    codes.extend(block[2..34].iter().map(|&b| b as i8));
                }
                PackedWeight {
                    rows,
                    cols,
                    codes: Codes::Bytes(codes),
                    scales,
                    offsets: None,
                }
            }
        };
        Ok(weight)
    }

    /// From NF4 codes in bitsandbytes' layout (two per byte, the first value of a pair in the
    /// high nibble) with one decoded absmax per block of `nf4_block` values (a multiple of 32).
    pub fn from_nf4(
        rows: usize,
        cols: usize,
        packed: &[u8],
        absmax: &[f32],
        nf4_block: usize,
        table: [f32; 16],
    ) -> Result<Self, PackError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) || !nf4_block.is_multiple_of(BLOCK) {
            return Err(PackError::Ragged {
                cols,
                block: nf4_block.max(BLOCK),
            });
        }
        let n = rows * cols;
        check("NF4 code bytes", n / 2, packed.len())?;
        check("NF4 absmax values", n.div_ceil(nf4_block), absmax.len())?;
        let blocks = n / BLOCK;
        let mut bytes = vec![0u8; n / 2];
        let mut scales = Vec::with_capacity(blocks);
        for b in 0..blocks {
            let code = |i: usize| {
                let byte = packed[i / 2];
                if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0f
                }
            };
            let start = b * BLOCK;
            for j in 0..16 {
                bytes[b * 16 + j] = code(start + j) | (code(start + j + 16) << 4);
            }
            scales.push(absmax[start / nf4_block]);
        }
        Ok(PackedWeight {
            rows,
            cols,
            codes: Codes::Nibbles { bytes, table },
            scales,
            offsets: None,
        })
    }

    /// Output features (rows of the weight).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of the weight).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: codes, scales and offsets.
    pub fn size_bytes(&self) -> usize {
        let codes = match &self.codes {
            Codes::Nibbles { bytes, .. } => bytes.len(),
            Codes::Bytes(b) => b.len(),
        };
        codes + 4 * self.scales.len() + 4 * self.offsets.as_ref().map_or(0, Vec::len)
    }

    /// The weight decoded to f32, row-major: the values every kernel multiplies with.
    pub fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_exact_mut(BLOCK)
            .enumerate()
            .for_each(|(b, chunk)| chunk.copy_from_slice(&self.decode_block(b)));
        out
    }

    /// Rows `ids` of the weight decoded to f32, one after another (`ids.len() · cols` values):
    /// a lookup in an embedding table kept packed. Errors for an id past the last row.
    pub fn decode_rows(&self, ids: &[u32]) -> Result<Vec<f32>, PackError> {
        let blocks = self.cols / BLOCK;
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let row = id as usize;
            if row >= self.rows {
                return Err(PackError::Row {
                    row,
                    rows: self.rows,
                });
            }
            for b in row * blocks..(row + 1) * blocks {
                out.extend_from_slice(&self.decode_block(b));
            }
        }
        Ok(out)
    }

    /// Block `b` (row-major over the whole weight) as f32 values.
    fn decode_block(&self, b: usize) -> [f32; BLOCK] {
        let scale = self.scales[b];
        let offset = self.offsets.as_ref().map_or(0.0, |o| o[b]);
        match &self.codes {
            Codes::Nibbles { bytes, table } => {
                let qs = &bytes[b * 16..b * 16 + 16];
                std::array::from_fn(|i| {
                    let code = if i < 16 {
                        qs[i] & 0x0f
                    } else {
                        qs[i - 16] >> 4
                    };
                    scale * table[code as usize] + offset
                })
            }
            Codes::Bytes(codes) => std::array::from_fn(|i| scale * f32::from(codes[b * BLOCK + i])),
        }
    }
}

/// The ggml block formats [`PackedWeight::from_ggml`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlBlocks {
    /// f16 scale, 16 bytes of 4-bit codes (value − 8).
    Q4_0,
    /// f16 scale, f16 min, 16 bytes of 4-bit codes.
    Q4_1,
    /// f16 scale, 32 signed bytes.
    Q8_0,
    /// Super-blocks of 256 values: f16 `d` and `dmin`, 12 bytes holding eight 6-bit scales and
    /// eight 6-bit minimums (one pair per 32 values), 128 bytes of 4-bit codes. Value
    /// `d·scale_j·code − dmin·min_j`, which is q4_1's form per 32 values: it is repacked as
    /// such, scale `d·scale_j` and offset `−dmin·min_j`, the products ggml's own decoding forms.
    Q4K,
}

impl GgmlBlocks {
    /// Bytes per block of the format.
    fn block_bytes(self) -> usize {
        match self {
            GgmlBlocks::Q4_0 => 18,
            GgmlBlocks::Q4_1 => 20,
            GgmlBlocks::Q8_0 => 34,
            GgmlBlocks::Q4K => 144,
        }
    }

    /// Values per block of the format.
    fn block_values(self) -> usize {
        match self {
            GgmlBlocks::Q4K => 256,
            _ => BLOCK,
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a q4_K super-block's 12 scale bytes
/// (ggml's `get_scale_min_k4`).
fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Repacks one q4_K super-block (144 bytes, 256 values) as eight 32-value blocks.
fn q4k_super_block(
    block: &[u8],
    bytes: &mut Vec<u8>,
    scales: &mut Vec<f32>,
    offsets: &mut Vec<f32>,
) {
    let (d, dmin) = (f16(block, 0), f16(block, 2));
    let scale_bytes = &block[4..16];
    let qs = &block[16..144];
    // Each 64 values share 32 code bytes: the first 32 values are their low nibbles, the next
    // 32 their high nibbles.
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        for (half, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = q4k_scale_min(2 * pair + half, scale_bytes);
            scales.push(d * f32::from(sc));
            offsets.push(-(dmin * f32::from(m)));
            let code = |l: usize| (q[l] >> shift) & 0x0f;
            bytes.extend((0..16).map(|i| code(i) | (code(i + 16) << 4)));
        }
    }
}

/// The instruction set a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512F.
    Avx512,
}

impl Isa {
    /// The best this CPU offers (decided once).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Isa::available();
            available.last().copied().unwrap_or(Isa::Scalar)
        })
    }

    /// Every instruction set this CPU can run, best last (tests compare them).
    pub fn available() -> &'static [Isa] {
        static AVAILABLE: OnceLock<Vec<Isa>> = OnceLock::new();
        AVAILABLE.get_or_init(Isa::probe)
    }

    fn probe() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }
}

/// Per-activation-row sums of each block of [`BLOCK`] values (for the offsets of affine
/// formats): `sums[r * blocks + b]`.
fn block_sums(x: &[f32], m: usize, cols: usize) -> Vec<f32> {
    let blocks = cols / BLOCK;
    let mut sums = vec![0f32; m * blocks];
    for (r, row) in x.chunks_exact(cols).enumerate() {
        for (b, chunk) in row.chunks_exact(BLOCK).enumerate() {
            sums[r * blocks + b] = chunk.iter().sum();
        }
    }
    sums
}

/// What one kernel call needs besides the output row index.
pub(crate) struct Operands<'a> {
    pub weight: &'a PackedWeight,
    /// `m · cols` activations, row-major.
    pub x: &'a [f32],
    /// [`block_sums`] of `x` (empty when the weight has no offsets).
    pub sums: &'a [f32],
}

/// `y = x · Wᵀ` for `m` rows of activations `x` (`m · cols`, row-major): `m · rows` values,
/// row-major, on the best instruction set ([`Isa::detect`]).
pub fn matmul(weight: &PackedWeight, x: &[f32], m: usize) -> Vec<f32> {
    matmul_on(Isa::detect(), weight, x, m)
}

/// [`matmul`] on a chosen instruction set, which must be one of [`Isa::available`] (anything
/// else runs the scalar code).
pub fn matmul_on(isa: Isa, weight: &PackedWeight, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (weight.rows, weight.cols);
    assert_eq!(x.len(), m * k, "activations must be m · cols");
    let sums = if weight.offsets.is_some() {
        block_sums(x, m, k)
    } else {
        Vec::new()
    };
    let ops = Operands {
        weight,
        x,
        sums: &sums,
    };
    let isa = if Isa::available().contains(&isa) {
        isa
    } else {
        Isa::Scalar
    };
    // Chunks of output rows, a few per thread so that uneven threads even out. Each task
    // writes only its own output columns of `y`.
    let team = Team::global();
    let chunk = n.div_ceil(team.threads() * 4).max(16);
    let mut y = vec![0f32; m * n];
    let out = Out(y.as_mut_ptr());
    team.run(n.div_ceil(chunk), &|c| {
        let rows = c * chunk..((c + 1) * chunk).min(n);
        for r0 in (0..m).step_by(TILE) {
            let t = TILE.min(m - r0);
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => x86::rows_avx512(&ops, rows.clone(), r0, t, out),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::rows_avx2(&ops, rows.clone(), r0, t, out),
                _ => scalar::rows(&ops, rows.clone(), r0, t, out),
            }
        }
    });
    y
}

/// The output of a product, written by several threads at disjoint indices.
#[derive(Clone, Copy)]
pub(crate) struct Out(*mut f32);

// SAFETY: tasks write disjoint elements (their own output columns), and `matmul_on` keeps the
// buffer alive until every task has finished.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Writes `v` at `i`.
    ///
    /// # Safety
    /// `i` is within the buffer and no other thread writes it.
    pub(crate) unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}
