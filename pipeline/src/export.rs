//! `pipeline export DIR --output FILE`: a trained or imported model's weights for PyTorch, as
//! `torch.save(model.state_dict(), FILE)` would have written them (`.pth`, `.pt`) or as a
//! safetensors file, under the names of the PyTorch definitions the user loads them into
//! (see [`engine::export`]).

use anyhow::{bail, Context as _, Result};
use candle_core::Device;
use engine::export;
use engine::import::Naming;
use engine::models::{Arch, Model};
use stages::artifacts::TrainedModel;
use std::path::{Path, PathBuf};

/// Options of `pipeline export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A train or import stage's folder (its `model.json` and `model.safetensors`).
    pub dir: PathBuf,
    /// The file to write: `.pth`, `.pt` or `.th` for `torch.save`'s format, `.safetensors`.
    #[arg(long, short)]
    pub output: PathBuf,
    /// The names to write: `torchvision` (ours; torchvision's and RepDistiller's CIFAR
    /// ResNets) or `kuangliu` (a ResNet's `shortcut` and `linear`, as kuangliu/pytorch-cifar,
    /// RepDistiller's ResNet18/50 and akamaster's ResNets name them).
    #[arg(long, value_enum, default_value_t = NamingArg::Torchvision)]
    pub naming: NamingArg,
    /// The type of every tensor written: `f32` (as trained), or `f16` / `bf16` (rounded to
    /// nearest, as PyTorch's `.half()` / `.bfloat16()`: half the size).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
}

/// `--dtype`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DtypeArg {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

/// `--naming`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum NamingArg {
    /// Ours: `downsample`, `fc` (torchvision, RepDistiller's CIFAR ResNets).
    Torchvision,
    /// A ResNet's `shortcut`, `linear` (kuangliu/pytorch-cifar, akamaster).
    Kuangliu,
}

/// Runs `pipeline export`.
pub fn export(args: &ExportArgs) -> Result<()> {
    refuse_inside(&args.dir, &args.output)?;
    let json = args.dir.join("model.json");
    let meta: TrainedModel = engine::json::read(&json).with_context(|| {
        format!(
            "{}: not a train or import stage's folder",
            args.dir.display()
        )
    })?;
    let arch = Arch::parse(&meta.spec.arch)?;
    let model = Model::new(&meta.spec, &Device::Cpu, 0)?;
    model.load(&args.dir.join("model.safetensors"))?;
    let naming = match args.naming {
        NamingArg::Torchvision => Naming::Torchvision,
        NamingArg::Kuangliu => Naming::Kuangliu,
    };
    let tensors: Vec<_> = model
        .tensors()
        .into_iter()
        .map(|(name, t)| (export::rename(&arch, naming, &name), t))
        .collect();
    let dtype = match args.dtype {
        DtypeArg::F32 => candle_core::DType::F32,
        DtypeArg::F16 => candle_core::DType::F16,
        DtypeArg::Bf16 => candle_core::DType::BF16,
    };
    let out = &args.output;
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or_default();
    let bytes = match ext.to_ascii_lowercase().as_str() {
        "pth" | "pt" | "th" => {
            let stem = out
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("archive");
            // The archive's folder name, as PyTorch's reader takes any: plain characters only.
            let stem: String = stem
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            export::pth_bytes(&stem, &tensors, dtype)?
        }
        "safetensors" => export::safetensors_bytes(&tensors, dtype)?,
        _ => bail!(
            "{}: the file's extension says its format: `.pth`, `.pt` or `.th` (torch.save), \
             `.safetensors`",
            out.display()
        ),
    };
    datasets::atomic::write_bytes(out, &bytes)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let naming = match args.naming {
        NamingArg::Torchvision => "torchvision",
        NamingArg::Kuangliu => "kuangliu",
    };
    println!(
        "wrote {} ({} {} tensors of {}, {naming} names, {} bytes)",
        out.display(),
        tensors.len(),
        dtype.as_str(),
        meta.spec.arch,
        bytes.len()
    );
    Ok(())
}

/// Refuses an output inside the stage folder `dir`: the runner owns what is there, and a file
/// written over the stage's weights would make it run again.
fn refuse_inside(dir: &Path, out: &Path) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{}: no such folder", dir.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = parent
        .canonicalize()
        .with_context(|| format!("{}: its folder does not exist", out.display()))?;
    if parent.starts_with(&dir) {
        bail!(
            "{}: inside the stage's folder {}, which the runner owns; write it elsewhere",
            out.display(),
            dir.display()
        );
    }
    Ok(())
}
