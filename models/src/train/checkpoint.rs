//! Checkpoints: trainable weights, optimizer moments, scaler, RNG, step and data position,
//! published atomically.
//!
//! Layout under the checkpoint root:
//! ```text
//! checkpoint-000000040/  adapter.safetensors  optimizer.safetensors  trainer_state.json
//! latest                 the name of the newest complete checkpoint directory
//! ```
//! A checkpoint is written into a hidden staging directory, each file flushed to disk, then the
//! directory is renamed into place, then `latest` is replaced by temp file + rename. A crash at
//! any point leaves the previous checkpoint intact and `latest` pointing at a complete one.

use super::{io_err, GradScalerState, Result, TrainError};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const ADAPTER: &str = "adapter.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer_state.json";
const LATEST: &str = "latest";

/// Everything besides tensors needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format version of this file.
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Micro-batches consumed since the start of training.
    pub data_position: u64,
    /// State of the trainer's random generator.
    pub rng_state: u64,
    /// AdamW's bias-correction step counter.
    pub optimizer_steps: u64,
    /// Loss-scaler state.
    pub scaler: GradScalerState,
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Trainable weights by name.
    pub weights: HashMap<String, Tensor>,
    /// Optimizer moments (`m.<name>`, `v.<name>`).
    pub optimizer: HashMap<String, Tensor>,
    /// Scalars.
    pub state: TrainerState,
}

/// Writes `bytes` to `path` atomically ([`crate::io::write_atomic`]).
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::io::write_atomic(path, bytes).map_err(io_err("write", path))
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("flush", path))
}

/// Saves a checkpoint for `state.step` under `root` and keeps only the newest `keep` (≥ 1).
pub fn save(
    root: &Path,
    weights: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io_err("create checkpoint directory", root))?;
    let name = format!("checkpoint-{:09}", state.step);
    let staging = root.join(format!(".staging-{name}"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err("remove stale", &staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_err("create", &staging))?;
    for (file, tensors) in [(ADAPTER, weights), (OPTIMIZER, optimizer)] {
        let p = staging.join(file);
        candle_core::safetensors::save(tensors, &p)?;
        sync_file(&p)?;
    }
    let json = serde_json::to_vec_pretty(state).map_err(|source| TrainError::Json {
        path: staging.join(STATE),
        source,
    })?;
    atomic_write(&staging.join(STATE), &json)?;
    let final_dir = root.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io_err("replace", &final_dir))?;
    }
    std::fs::rename(&staging, &final_dir).map_err(io_err("publish checkpoint", &final_dir))?;
    atomic_write(&root.join(LATEST), name.as_bytes())?;
    prune(root, keep.max(1))?;
    Ok(final_dir)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io_err("list", root))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("checkpoint-"))
        })
        .collect();
    dirs.sort();
    let n = dirs.len();
    for d in dirs.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&d).map_err(io_err("remove old checkpoint", &d))?;
    }
    Ok(())
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    let p = root.join(LATEST);
    match std::fs::read_to_string(&p) {
        Ok(name) => {
            let dir = root.join(name.trim());
            if dir.is_dir() {
                Ok(Some(dir))
            } else {
                Err(TrainError::Checkpoint {
                    path: dir,
                    reason: "`latest` names a checkpoint that does not exist; delete `latest` to \
                             start over or restore the directory"
                        .into(),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", &p)(e)),
    }
}

/// Loads the checkpoint in `dir` onto `device`.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(io_err("read", &state_path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|source| TrainError::Json {
        path: state_path.clone(),
        source,
    })?;
    if state.version != 1 {
        return Err(bad(format!(
            "unsupported trainer_state version {}",
            state.version
        )));
    }
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(file);
        if !p.is_file() {
            return Err(bad(format!("`{file}` is missing")));
        }
        Ok(candle_core::safetensors::load(&p, device)?)
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        weights: read(ADAPTER)?,
        optimizer: read(OPTIMIZER)?,
        state,
    })
}
