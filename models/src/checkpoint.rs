//! Gradient (activation) checkpointing: a block's forward keeps only its input and output;
//! its backward runs the forward again, with the same dropout masks, and backpropagates
//! through that.
//!
//! candle keeps every intermediate of a forward alive until its backward ends, so training
//! memory grows with everything every layer computes (phi-1.5 at 2 x 512 in f32 on the CPU:
//! 22.6 GiB, `bench/phi15_memory.sh`). Checkpointing each decoder layer trades one extra forward
//! per layer (a third more arithmetic in theory: backward is about twice a forward) for keeping
//! one hidden state per layer (4.3 GiB there), as `prepare_model_for_kbit_training` does for the
//! QLoRA replication in PyTorch.
//!
//! The mechanism is a candle custom op whose backward recomputes the block. Its input gradient
//! goes back through the graph as usual; the gradients of the block's own trainable variables
//! cannot (a custom op only returns gradients for its tensor argument), so they are collected
//! on the side, per thread, and [`take_side_gradients`] hands them to the trainer after
//! `backward()`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor,
    TensorId, Var,
};

use crate::linear::LinearLayer;

/// A piece of a model that can be run again: a decoder layer with its positions and mask.
pub trait Block: Send + Sync {
    /// The block's forward on `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// Every linear layer inside, in a fixed order: their dropout positions are replayed and
    /// their trainable variables get the recomputed gradients.
    fn linears(&self) -> Vec<&dyn LinearLayer>;
}

thread_local! {
    /// Gradients of trainable variables inside checkpointed blocks, by variable, summed over
    /// the blocks' backward passes on this thread since the last [`take_side_gradients`].
    static SIDE_GRADIENTS: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

/// Takes the gradients that checkpointed blocks' backward passes on this thread produced for
/// their trainable variables (see the module docs), leaving none behind. Call it after every
/// `backward()` (also to discard those of a failed one) and add them to the graph's gradients.
pub fn take_side_gradients() -> HashMap<TensorId, Tensor> {
    SIDE_GRADIENTS.with(|g| std::mem::take(&mut *g.borrow_mut()))
}

/// The gradient of `var` from `grads` plus any checkpointed blocks' side gradient for it (from
/// `side`, which [`take_side_gradients`] filled); `None` when neither has one.
pub fn total_gradient(
    grads: &GradStore,
    side: &HashMap<TensorId, Tensor>,
    var: &Var,
) -> Result<Option<Tensor>> {
    match (grads.get(var.as_tensor()), side.get(&var.as_tensor().id())) {
        (Some(a), Some(b)) => Ok(Some((a + b)?)),
        (Some(a), None) => Ok(Some(a.clone())),
        (None, Some(b)) => Ok(Some(b.clone())),
        (None, None) => Ok(None),
    }
}

fn dropout_positions(block: &dyn Block) -> Vec<u64> {
    block
        .linears()
        .iter()
        .map(|l| l.dropout_position())
        .collect()
}

fn set_dropout_positions(block: &dyn Block, positions: &[u64]) {
    for (l, &p) in block.linears().iter().zip(positions) {
        l.set_dropout_position(p);
    }
}

/// Runs `block` on `x`, keeping none of its intermediates; the backward recomputes them.
///
/// When `x` records no backward (the first layer's input, the embedding of frozen token ids),
/// there is nothing to hang the recomputation on, so the block runs normally.
pub fn checkpoint(block: Arc<dyn Block>, x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return block.forward(x);
    }
    let before = dropout_positions(&*block);
    // The graph this forward records (through the adapters' variables) is dropped at once;
    // only the values are kept.
    let output = block.forward(&x.detach())?.detach();
    // The op hands out a clone of the output's whole storage, so the output must start it (a
    // layer's last op, the residual add, allocates exactly its result).
    let output = if output.is_contiguous() && output.layout().start_offset() == 0 {
        output
    } else {
        output.force_contiguous()?
    };
    let after = dropout_positions(&*block);
    let op = CheckpointOp {
        block,
        output: output.clone(),
        before,
        after,
    };
    x.apply_op1(op)
}

struct CheckpointOp {
    block: Arc<dyn Block>,
    /// The block's output, computed at the forward; the op's forward hands out a copy.
    output: Tensor,
    /// Dropout positions of the block's layers before and after the forward.
    before: Vec<u64>,
    after: Vec<u64>,
}

impl CheckpointOp {
    fn output_storage<S: BackendStorage>(
        &self,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<S> {
        let (storage, layout) = self.output.storage_and_layout();
        let s = pick(&storage).ok_or_else(|| {
            candle_core::Error::Msg("checkpointed block output on another device".into())
        })?;
        s.try_clone(layout)
    }
}

impl CustomOp1 for CheckpointOp {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = self.output_storage(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })?;
        Ok((s, self.output.shape().clone()))
    }

    // Compiled in every build (candle has stand-in GPU storages without its GPU features), so
    // the CPU build type-checks these too.
    fn cuda_fwd(&self, _storage: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let s = self.output_storage(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })?;
        Ok((s, self.output.shape().clone()))
    }

    fn metal_fwd(
        &self,
        _storage: &MetalStorage,
        _layout: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        let s = self.output_storage(|s| match s {
            Storage::Metal(c) => Some(c),
            _ => None,
        })?;
        Ok((s, self.output.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Replay: the same dropout masks as the forward drew.
        set_dropout_positions(&*self.block, &self.before);
        let input = Var::from_tensor(&arg.detach())?;
        let recomputed = self.block.forward(input.as_tensor());
        set_dropout_positions(&*self.block, &self.after);
        // d(sum(y * g))/dθ = J_θᵀ g for every θ in the block: its input and its variables.
        let grads = (recomputed? * grad_res.detach())?.sum_all()?.backward()?;
        SIDE_GRADIENTS.with(|side| -> Result<()> {
            let mut side = side.borrow_mut();
            for layer in self.block.linears() {
                for (_, var) in layer.trainable_vars() {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        let id = var.as_tensor().id();
                        let total = match side.remove(&id) {
                            Some(prev) => (prev + g)?,
                            None => g.clone(),
                        };
                        side.insert(id, total);
                    }
                }
            }
            Ok(())
        })?;
        Ok(grads.get(input.as_tensor()).cloned())
    }
}
