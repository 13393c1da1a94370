//! Matrix products on CPU slices, through the same `gemm` crate candle's CPU matmul uses, for
//! kernels that want what candle's `matmul` cannot give: accumulating into an existing buffer
//! (`dst += β·A·B`), and a fresh output written once (candle zero-fills every matmul result
//! before the product overwrites it, a full extra pass over memory).

use candle_core::Result;

/// A read-only matrix view over a slice: element `(i, j)` is `data[i * row_stride + j *
/// col_stride]`. Transposing swaps the strides, no data moves.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows x cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A matrix with explicit strides; errors if any element falls outside `data`.
    pub fn strided(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            if last >= data.len() {
                candle_core::bail!(
                    "matrix view {rows}x{cols} (strides {row_stride}, {col_stride}) needs {} \
                     elements, the buffer has {}",
                    last + 1,
                    data.len()
                );
            }
        }
        Ok(Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A 2-D CPU tensor's storage as a matrix view, whatever its strides.
    pub fn of_cpu(cpu: &'a candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<Self>
    where
        T: candle_core::WithDType,
    {
        let (rows, cols) = layout.shape().dims2()?;
        let &[row_stride, col_stride] = layout.stride() else {
            candle_core::bail!("expected a 2-D matrix, got strides {:?}", layout.stride());
        };
        Self::strided(
            &cpu.as_slice::<T>()?[layout.start_offset()..],
            rows,
            cols,
            row_stride,
            col_stride,
        )
    }

    /// As [`MatRef::of_cpu`] for a tensor's storage; errors for storage off the CPU.
    pub fn of_storage(
        storage: &'a candle_core::Storage,
        layout: &candle_core::Layout,
    ) -> Result<Self>
    where
        T: candle_core::WithDType,
    {
        match storage {
            candle_core::Storage::Cpu(cpu) => Self::of_cpu(cpu, layout),
            _ => candle_core::bail!("matrix view: the tensor is not on the CPU"),
        }
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Where a product runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Split over rayon's pool, like candle's own matmul: for one big product.
    Pool,
    /// On the calling thread: for the many small products of a kernel that is already
    /// parallel over them (attention heads).
    One,
}

/// `lhs · rhs · beta` as a fresh row-major `lhs.rows x rhs.cols` vector. The output is written
/// once, never zero-filled first.
pub(crate) fn matmul<T: GemmFloat>(
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    beta: T,
    threads: Threads,
) -> Result<Vec<T>> {
    let (m, n) = check(lhs, rhs)?;
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    if lhs.cols == 0 {
        out.resize(m * n, T::ZERO);
        return Ok(out);
    }
    // SAFETY: with `read_dst = false` gemm writes every one of the m x n elements of the
    // destination without reading it, so the spare capacity is fully initialised before
    // `set_len`; the views were bounds-checked at construction.
    unsafe {
        run(out.as_mut_ptr(), false, lhs, rhs, beta, threads);
        out.set_len(m * n);
    }
    Ok(out)
}

/// `dst = beta·lhs·rhs`, overwriting `dst` (`[m, n]`, row-major) without reading it: for
/// reusing one buffer across products.
pub(crate) fn matmul_into<T: GemmFloat>(
    dst: &mut [T],
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    beta: T,
    threads: Threads,
) -> Result<()> {
    if lhs.cols == 0 {
        dst.fill(T::ZERO);
    }
    product_into(dst, false, lhs, rhs, beta, threads)
}

/// `dst += beta · lhs · rhs` into an existing row-major `lhs.rows x rhs.cols` buffer.
pub(crate) fn matmul_acc<T: GemmFloat>(
    dst: &mut [T],
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    beta: T,
    threads: Threads,
) -> Result<()> {
    product_into(dst, true, lhs, rhs, beta, threads)
}

fn product_into<T: GemmFloat>(
    dst: &mut [T],
    read_dst: bool,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    beta: T,
    threads: Threads,
) -> Result<()> {
    let (m, n) = check(lhs, rhs)?;
    if dst.len() != m * n {
        candle_core::bail!(
            "matmul output {m}x{n} needs {} elements, got {}",
            m * n,
            dst.len()
        );
    }
    if lhs.cols > 0 {
        // SAFETY: `dst` is a unique borrow of exactly m x n elements (so it aliases neither
        // input) and the views were bounds-checked at construction.
        unsafe { run(dst.as_mut_ptr(), read_dst, lhs, rhs, beta, threads) };
    }
    Ok(())
}

/// The element types the products take.
pub(crate) trait GemmFloat: 'static + Copy + Send + Sync {
    const ZERO: Self;
    const ONE: Self;
}

impl GemmFloat for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl GemmFloat for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

fn check<T>(lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) -> Result<(usize, usize)> {
    if rhs.rows != lhs.cols {
        candle_core::bail!(
            "matmul of {}x{} by {}x{}: inner dimensions differ",
            lhs.rows,
            lhs.cols,
            rhs.rows,
            rhs.cols
        );
    }
    Ok((lhs.rows, rhs.cols))
}

/// # Safety
/// `dst` must be valid for writes (and reads, with `read_dst`) of `lhs.rows x rhs.cols`
/// row-major elements and must not overlap the inputs.
unsafe fn run<T: GemmFloat>(
    dst: *mut T,
    read_dst: bool,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    beta: T,
    threads: Threads,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if m == 0 || n == 0 {
        return;
    }
    let pool = rayon::current_num_threads();
    let parallelism = if threads == Threads::Pool && pool > 1 {
        gemm::Parallelism::Rayon(pool)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        read_dst,
        lhs.data.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        T::ONE,
        beta,
        false,
        false,
        false,
        parallelism,
    );
}
