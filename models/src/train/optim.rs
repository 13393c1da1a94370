//! AdamW (decoupled weight decay, `torch.optim.AdamW` update) with f32 master weights and f32
//! moment state.

use super::{Result, TrainError};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay (0.9).
    pub beta1: f64,
    /// Second-moment decay (0.999).
    pub beta2: f64,
    /// Denominator epsilon (1e-8).
    pub eps: f64,
    /// Decoupled weight decay; 0 disables it. It applies to every variable the optimizer
    /// holds, which in LoRA training are only the adapter matrices (`lora_A`/`lora_B`): the
    /// biases and norm weights that should never decay stay frozen. transformers' `Trainer`
    /// decays the same set.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named f32 variables.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
}

impl AdamW {
    /// An optimizer over `params`, which must be f32 (the master weights) with unique names.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for (name, var) in &params {
            if var.dtype() != DType::F32 {
                return Err(TrainError::Config(format!(
                    "trainable variable `{name}` is {:?}; keep trainable weights in f32 and cast \
                     in the forward pass (f16/bf16 optimizer state breaks AdamW)",
                    var.dtype()
                )));
            }
            if !seen.insert(name.clone()) {
                return Err(TrainError::Config(format!(
                    "two trainable variables are named `{name}`"
                )));
            }
        }
        let zeros = |(_, v): &(String, Var)| v.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            m,
            v,
            steps: 0,
        })
    }

    /// The variables, in order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Optimizer steps taken (the bias-correction counter).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params()[i]` (f32 or castable).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(TrainError::Config(format!(
                "AdamW got {} gradients for {} variables",
                grads.len(),
                self.params.len()
            )));
        }
        self.steps += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bc2 = 1.0 - c.beta2.powi(self.steps as i32);
        for (i, (_, var)) in self.params.iter().enumerate() {
            let g = grads[i].detach().to_dtype(DType::F32)?;
            let mut p = var.as_tensor().detach();
            if c.weight_decay != 0.0 {
                p = p.affine(1.0 - lr * c.weight_decay, 0.0)?;
            }
            let m = ((self.m[i].affine(c.beta1, 0.0))? + g.affine(1.0 - c.beta1, 0.0)?)?;
            let v = ((self.v[i].affine(c.beta2, 0.0))? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), c.eps)?;
            let update = (&m / denom)?.affine(lr / bc1, 0.0)?;
            var.set(&(p - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moment tensors keyed `m.<name>` / `v.<name>` (for checkpoints).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step counter.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{kind}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| TrainError::Config(format!("optimizer state has no `{key}`")))?;
                if t.dims() != var.dims() || t.dtype() != DType::F32 {
                    return Err(TrainError::Config(format!(
                        "optimizer state `{key}` is {:?} {:?}, the variable is {:?} F32",
                        t.dtype(),
                        t.dims(),
                        var.dims()
                    )));
                }
                *slot = t.to_device(var.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}
