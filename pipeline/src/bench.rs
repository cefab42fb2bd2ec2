//! `pipeline bench`: throughput benchmarks of the parts that decide training speed, printed as
//! tables to set beside the PyTorch scripts in `benches/` (run on the same machine).
//!
//! `bench loader` measures the batch loader on CIFAR-shaped data, ImageNet-shaped data
//! (`--imagenet-shaped`) or an existing packed split (`--pack`): images per second delivered as
//! normalised `f32` NCHW batches, for crop + flip + normalise with and without CutMix, at each
//! worker count asked for. The consumer does nothing but hand buffers back, so the figure is the
//! loader's ceiling; `benches/torch_loader.py` does the same work with torchvision.
//!
//! `bench train` measures training steps (forward, cross-entropy, backward, SGD with momentum) of
//! a model on random CIFAR-shaped batches held on the device; `benches/torch_train.py` is the
//! PyTorch counterpart.

use anyhow::{Context as _, Result};
use datasets::augment::{Augment, Normalize};
use datasets::mix::Mix;
use datasets::view::View;
use datasets::{Loader, LoaderConfig, PackedStore, PackedWriter, StoreInfo};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Options of `pipeline bench loader`.
#[derive(clap::Args, Debug)]
pub struct LoaderArgs {
    /// Read the training batches of a CIFAR-10 binary folder (e.g. ../shared/data/cifar-10-batches-bin)
    /// instead of random CIFAR-shaped images.
    #[arg(long, value_name = "DIR")]
    pub cifar10: Option<PathBuf>,
    /// Random images to generate when no data folder is given.
    #[arg(long, default_value_t = 50_000)]
    pub images: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Worker counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub workers: Vec<usize>,
    /// Epochs timed per configuration (after one untimed warm-up epoch).
    #[arg(long, default_value_t = 3)]
    pub epochs: u64,
    /// ImageNet's training view instead: random 3×256×256 images (or `--pack`'s; as packed at
    /// `image_size = 256`), a random resized crop to 224 (Pillow's bilinear resampling), flip
    /// and normalisation; compare with `benches/torch_loader.py --imagenet-shaped`.
    #[arg(long, conflicts_with = "cifar10")]
    pub imagenet_shaped: bool,
    /// Time the loader over this packed split instead (a prepare stage's `train.pack`, e.g. an
    /// ImageFolder packed with or without `keep_aspect`); with `--imagenet-shaped`, its views
    /// are random resized crops to 224; without it, CIFAR's pad-4 crop + flip of whole images
    /// (packs of one size only).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["cifar10", "images"])]
    pub pack: Option<PathBuf>,
}

fn cifar_shaped(args: &LoaderArgs) -> Result<(StoreInfo, Vec<u32>, Vec<u8>, String)> {
    if let Some(dir) = &args.cifar10 {
        let batches: Vec<u32> = (1..=5)
            .filter(|b| dir.join(format!("data_batch_{b}.bin")).exists())
            .collect();
        let (train, _) = datasets::cifar::cifar10(dir, Some(&batches))
            .with_context(|| format!("reading CIFAR-10 from {}", dir.display()))?;
        let what = format!("CIFAR-10 training batches {batches:?} of {}", dir.display());
        return Ok((train.0, train.1, train.2, what));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let n = args.images;
    let side = if args.imagenet_shaped { 256 } else { 32 };
    let pixels: Vec<u8> = (0..n * 3 * side * side).map(|_| rng.random()).collect();
    let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
    let info = StoreInfo {
        n,
        c: 3,
        h: side,
        w: side,
        classes: (0..10).map(|k| format!("class{k}")).collect(),
        varying: false,
    };
    Ok((
        info,
        labels,
        pixels,
        format!("{n} random 3×{side}×{side} images"),
    ))
}

struct TempPack(PathBuf);
impl Drop for TempPack {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn time_loader(store: &Arc<PackedStore>, config: LoaderConfig, epochs: u64) -> f64 {
    let loader = Loader::new(store.clone(), config);
    let drain = |epoch| {
        let mut it = loader.epoch(epoch, 0);
        let mut n = 0;
        while let Some(b) = it.next() {
            n += b.len();
            it.recycle(b);
        }
        n
    };
    drain(0);
    let t0 = Instant::now();
    let images: usize = (1..=epochs).map(drain).sum();
    images as f64 / t0.elapsed().as_secs_f64()
}

/// The split `pipeline bench loader` reads: `--pack`'s, or one generated (or read from
/// `--cifar10`) into a temporary file, removed when the returned guard drops.
fn bench_store(args: &LoaderArgs) -> Result<(Arc<PackedStore>, String, Option<TempPack>)> {
    if let Some(path) = &args.pack {
        let store = PackedStore::open(path)?;
        let info = store.info();
        if info.varying && !args.imagenet_shaped {
            anyhow::bail!(
                "{}: its images vary in size (packed with `keep_aspect`): time it with \
                 --imagenet-shaped, whose crops give batches one size",
                path.display()
            );
        }
        let what = format!(
            "{} images of {} ({}, at least {}×{})",
            info.n,
            path.display(),
            if info.varying {
                "sizes vary"
            } else {
                "one size"
            },
            info.h,
            info.w
        );
        return Ok((Arc::new(store), what, None));
    }
    let (info, labels, pixels, what) = cifar_shaped(args)?;
    let path = std::env::temp_dir().join(format!("ldl-bench-loader-{}.pack", std::process::id()));
    let cleanup = TempPack(path.clone());
    PackedWriter::write(&path, &info, &labels, &pixels)?;
    drop(pixels);
    Ok((Arc::new(PackedStore::open(&path)?), what, Some(cleanup)))
}

/// Runs `pipeline bench loader` and prints its table.
pub fn loader(args: &LoaderArgs) -> Result<()> {
    let (store, what, _cleanup) = bench_store(args)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "loader benchmark: {what}, batch {}, f32 NCHW, {} timed epoch(s) after a warm-up, {cores} cores",
        args.batch, args.epochs
    );
    println!();
    println!("| augmentation | workers | images/s |");
    println!("|---|---:|---:|");
    let normalize = Normalize {
        mean: vec![0.4914, 0.4822, 0.4465],
        std: vec![0.2470, 0.2435, 0.2616],
    };
    let setups: &[(&str, View, Augment, Mix)] = if args.imagenet_shaped {
        &[(
            "random-resized-crop(224)+flip+normalise",
            View::random_resized(224),
            Augment::FLIP,
            Mix::None {},
        )]
    } else {
        &[
            (
                "crop+flip+normalise",
                View::Whole,
                Augment::CROP_FLIP,
                Mix::None {},
            ),
            (
                "crop+flip+normalise+CutMix (p = 1)",
                View::Whole,
                Augment::CROP_FLIP,
                Mix::Cutmix { beta: 1.0, p: 1.0 },
            ),
        ]
    };
    for &(name, view, augment, mix) in setups {
        let info = store.info();
        view.check((info.h, info.w))
            .map_err(|why| anyhow::anyhow!("{what}: {why}"))?;
        for &workers in &args.workers {
            let config = LoaderConfig {
                batch_size: args.batch,
                shuffle: true,
                drop_last: false,
                view,
                augment,
                normalize: normalize.clone(),
                mix,
                workers: workers.max(1),
                prefetch: 2,
                seed: 0,
                rotations: false,
            };
            let rate = time_loader(&store, config, args.epochs);
            println!("| {name} | {workers} | {rate:.0} |");
        }
    }
    Ok(())
}

/// Options of `pipeline bench train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Architecture (as the `model` key of a train stage).
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Channels of the first stage (default: the architecture's).
    #[arg(long)]
    pub width: Option<usize>,
    /// Images per step.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Height and width of the random images (32, CIFAR's; 224 for ImageNet's).
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Untimed steps first (allocations, kernel compilation).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Activations and convolutions in `f32`, or `bf16` (CUDA only; f32 master weights,
    /// optimizer state, BatchNorm statistics and loss), as `dtype` of a train stage.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also print where the time of a step goes: forward, backward and optimizer, and within
    /// them the CPU kernels (convolution, BatchNorm, residual add + ReLU); the remainder is
    /// candle's own work (gradient accumulation, the loss, the classifier head, pooling).
    #[arg(long)]
    pub profile: bool,
    /// Take the step through candle's autograd instead of the backbone's planned program
    /// (as before it existed), for comparisons.
    #[arg(long)]
    pub no_plan: bool,
    /// An On-LDL step instead: this architecture as the teacher, applied in evaluation mode to
    /// every batch, its softmax the student's target (soft cross-entropy), as an `on-ldl`
    /// student trains; `benches/torch_train.py --teacher` is the same step in PyTorch.
    #[arg(long)]
    pub teacher: Option<String>,
}

/// Runs `pipeline bench train`: images/s of forward + cross-entropy + backward + SGD-momentum
/// steps on random CIFAR-shaped batches already on the device, after a warm-up, the device
/// synchronised before each clock reading (the same step as `benches/torch_train.py`).
/// Options this build or device cannot honour are a [`UsageError`](crate::UsageError).
pub fn train(args: &TrainArgs) -> Result<()> {
    use candle_core::{DType, Tensor};
    use engine::device::DeviceSpec;
    use engine::optim::{Sgd, SgdConfig};

    let spec_dev: DeviceSpec = args
        .device
        .parse()
        .map_err(|m| crate::UsageError(format!("--device: {m}")))?;
    spec_dev
        .available()
        .map_err(|m| crate::UsageError(format!("--device: {m}")))?;
    let precision: engine::device::Precision = args
        .dtype
        .parse()
        .map_err(|m| crate::UsageError(format!("--dtype: {m}")))?;
    precision
        .check(spec_dev)
        .map_err(|m| crate::UsageError(format!("--dtype: {m}")))?;
    if args.image_size == 0 {
        return Err(crate::UsageError("--image-size: must be at least 1".into()).into());
    }
    let device = spec_dev.open()?;
    let (spec, model, planned, teacher) = bench_models(args, &device, precision.dtype())?;
    let mut opt = Sgd::new(
        model.trainable(),
        SgdConfig {
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
        },
    );
    // A random batch (CIFAR-shaped by default) with every class in turn as its labels.
    let side = args.image_size;
    let x = Tensor::randn(0f32, 1.0, (args.batch, 3, side, side), &device)?
        .to_dtype(precision.dtype())?;
    let labels: Vec<u32> = (0..args.batch as u32)
        .map(|i| i % args.classes as u32)
        .collect();
    let y = Tensor::from_vec(labels, args.batch, &device)?;
    let mut step = Step {
        model: &model,
        teacher: teacher.as_ref(),
        opt: &mut opt,
        x: &x,
        y: &y,
        device: &device,
        profile: args.profile,
        phases: [0.0; 3],
    };
    for _ in 0..args.warmup {
        step.run()?;
    }
    device.synchronize()?;
    step.phases = [0.0; 3];
    peak_memory(&device, true)?;
    engine::profile::reset();
    engine::profile::set_enabled(args.profile);
    let replays_before = engine::models::net::graph_replays();
    let t0 = Instant::now();
    let mut last = None;
    for _ in 0..args.steps {
        last = Some(step.run()?);
    }
    device.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    let peak = peak_memory(&device, false)?;
    engine::profile::set_enabled(false);
    let loss = match last {
        Some(l) => l.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        None => f32::NAN,
    };
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    let what = match &args.teacher {
        Some(t) => format!("On-LDL step with teacher {t}"),
        None => "cross-entropy step".to_string(),
    };
    println!(
        "training benchmark ({what}): {} (width {}), batch {} of {side}×{side} images, device {spec_dev} (CPU threads: {threads}), {}, {}, {} warm-up + {} timed steps",
        spec.arch,
        spec.width,
        args.batch,
        args.dtype,
        step_kind(
            planned,
            engine::models::net::graph_replays() - replays_before,
            &device
        ),
        args.warmup,
        args.steps
    );
    let model_row = (spec.arch.as_str(), model.parameter_count(), spec_dev);
    print_result(args, model_row, secs, peak, loss);
    if args.profile {
        print_profile(&step.phases, secs, args.steps.max(1));
    }
    Ok(())
}

/// One benchmark step: the teacher's softmax (`--teacher`) or the labels as the target, the
/// student's forward pass and loss, its backward pass, an SGD step at a fixed rate.
struct Step<'a> {
    model: &'a engine::models::Model,
    teacher: Option<&'a engine::models::Model>,
    opt: &'a mut engine::optim::Sgd,
    x: &'a candle_core::Tensor,
    y: &'a candle_core::Tensor,
    device: &'a candle_core::Device,
    /// Synchronise the device between phases, so each is timed whole.
    profile: bool,
    /// Wall time of the forward pass (with the loss), the backward pass and the optimizer step.
    phases: [f64; 3],
}

impl Step<'_> {
    /// Runs one step and returns its loss, detached: a candle tensor holds its whole graph
    /// (every activation of the step) until dropped, and the caller keeps the last loss while
    /// the next step runs, which doubled the peak memory of autograd steps.
    fn run(&mut self) -> Result<candle_core::Tensor> {
        let t = Instant::now();
        let target = match self.teacher {
            Some(teacher) => Some(candle_nn::ops::softmax_last_dim(
                &teacher.net.forward_t(self.x, false)?.detach(),
            )?),
            None => None,
        };
        let logits = self.model.net.forward_t(self.x, true)?;
        let loss = match &target {
            Some(q) => engine::losses::soft_cross_entropy(&logits, q)?,
            None => engine::losses::cross_entropy(&logits, self.y)?,
        };
        self.sync()?;
        let t1 = Instant::now();
        let grads = self.model.net.backward(&loss)?;
        self.sync()?;
        let t2 = Instant::now();
        self.opt.step(&grads, 0.05)?;
        self.sync()?;
        self.phases[0] += (t1 - t).as_secs_f64();
        self.phases[1] += (t2 - t1).as_secs_f64();
        self.phases[2] += t2.elapsed().as_secs_f64();
        Ok(loss.detach())
    }

    fn sync(&self) -> Result<()> {
        if self.profile {
            self.device.synchronize()?;
        }
        Ok(())
    }
}

/// The result table: the model's architecture, parameter count and device, then the dtype,
/// images/s, ms per step, peak device memory (`–` where unknown) and the last step's loss.
fn print_result(
    args: &TrainArgs,
    (arch, params, device): (&str, usize, engine::device::DeviceSpec),
    secs: f64,
    peak: Option<u64>,
    loss: f32,
) {
    println!();
    println!(
        "| model | params | device | dtype | images/s | ms/step | peak memory (MiB) | last loss |"
    );
    println!("|---|---:|---|---|---:|---:|---:|---:|");
    println!(
        "| {arch} | {params} | {device} | {} | {:.0} | {:.1} | {} | {loss:.3} |",
        args.dtype,
        (args.steps * args.batch) as f64 / secs,
        1000.0 * secs / args.steps.max(1) as f64,
        peak.map_or("–".to_string(), |b| format!(
            "{:.0}",
            b as f64 / (1u64 << 20) as f64
        ))
    );
}

/// The benchmark's student (planned unless `--no-plan` or the device does not plan), whether its
/// step is planned, and the `--teacher` (planned inference likewise), from fixed seeds.
fn bench_models(
    args: &TrainArgs,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<(
    engine::models::ModelSpec,
    engine::models::Model,
    bool,
    Option<engine::models::Model>,
)> {
    use engine::models::{Model, ModelSpec};
    let plan = engine::models::plan::wanted(device) && !args.no_plan;
    let mut spec = ModelSpec::new(&args.model, args.classes, 3)?;
    if let Some(w) = args.width {
        spec.width = w;
    }
    let mut model = Model::new(&spec, device, 0)?;
    let planned = model.net.plan_training(plan.then_some(dtype));
    let teacher = match &args.teacher {
        Some(arch) => {
            let spec = ModelSpec::new(arch, args.classes, 3)
                .with_context(|| format!("--teacher {arch}"))?;
            let mut t = Model::new(&spec, device, 1)?;
            t.net.plan_inference(plan);
            Some(t)
        }
        None => None,
    };
    Ok((spec, model, planned, teacher))
}

/// The device's peak memory in bytes since the last reset (CUDA; `None` elsewhere), resetting
/// the mark when `reset`.
fn peak_memory(device: &candle_core::Device, reset: bool) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        return Ok(engine::gpu::memory_high_water(d, reset)?);
    }
    let _ = (device, reset);
    Ok(None)
}

/// How the step ran, for the header: autograd or planned, with the planned step's CUDA options
/// (channels-last and the shapes it had to transpose) and the graph replays seen.
fn step_kind(planned: bool, replays: u64, device: &candle_core::Device) -> String {
    if !planned {
        return "autograd step".to_string();
    }
    let mut s = "planned step".to_string();
    let options = engine::models::plan::PlanOptions::from_env();
    if device.is_cuda() && options.channels_last {
        s += ", channels-last (NHWC)";
        let t = engine::models::net::transposed_convolutions();
        if t > 0 {
            s += &format!(", {t} convolution shapes run transposed (no cuDNN NHWC plan)");
        }
    }
    if replays > 0 {
        s += &format!(", {replays} recorded passes replayed (CUDA graphs)");
    }
    s
}

/// The `--profile` table: each phase of a step, the timed kernels within it, and the rest.
fn print_profile(phases: &[f64; 3], secs: f64, steps: usize) {
    use engine::profile::{totals, Section};
    let ms = |s: f64| 1000.0 * s / steps as f64;
    let share = |s: f64| 100.0 * s / secs;
    let totals = totals();
    println!();
    println!("| part of a step | ms/step | share | calls/step |");
    println!("|---|---:|---:|---:|");
    let names = ["forward + loss", "backward", "optimizer"];
    for (p, (&phase, name)) in phases.iter().zip(names).enumerate() {
        println!("| **{name}** | {:.1} | {:.1}% | |", ms(phase), share(phase));
        let mut kernels = 0.0;
        for &(s, t, calls) in &totals {
            let mine = match p {
                0 => s.is_forward(),
                1 => !s.is_forward() && s != Section::OptimizerStep,
                _ => s == Section::OptimizerStep,
            };
            if mine && calls > 0 {
                kernels += t;
                println!(
                    "| {} | {:.1} | {:.1}% | {} |",
                    s.label(),
                    ms(t),
                    share(t),
                    calls / steps as u64
                );
            }
        }
        if p < 2 {
            let rest = (phase - kernels).max(0.0);
            println!(
                "| other (candle ops, gradient accumulation) | {:.1} | {:.1}% | |",
                ms(rest),
                share(rest)
            );
        }
    }
    let untimed = (secs - phases.iter().sum::<f64>()).max(0.0);
    println!(
        "| between phases | {:.1} | {:.1}% | |",
        ms(untimed),
        share(untimed)
    );
}
