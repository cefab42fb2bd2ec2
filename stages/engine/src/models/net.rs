//! A classifier: a backbone (any architecture of [`super::Arch`]) up to its last feature maps,
//! then global average pooling, an optional dropout and a linear classifier. Everything the
//! stages ask of a model (features, logits, Monte-Carlo dropout, the classifier's templates)
//! is here once, whatever the backbone, and so is the choice of the planned training step's
//! kernels for the device the network lives on ([`plan`]).

use super::dropout::{Dropout, Mode};
use super::no_grad::{self, NoGrad};
use super::plan::{Plan, PlanOptions, Planned, Program};
use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};
use std::sync::Mutex;

/// The part of a network that differs between architectures: images `N × C × H × W` to the
/// last feature maps `N × D × h × w` (in the activations' type), BatchNorm in batch statistics
/// when `train`.
pub trait Backbone: Send + Sync {
    /// The last feature maps.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    /// Their channels D: the length of the penultimate features.
    fn feature_dim(&self) -> usize;
    /// The backbone as a planned program for training steps ([`super::plan`]), when it has
    /// one.
    fn program(&self) -> Option<Program> {
        None
    }
}

/// Forward passes this process ran through a plan.
static PLANNED_FORWARDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many forward passes this process ran through a planned backbone: for tests and logs
/// (a plan falls back to the autograd path for images it does not accept).
pub fn planned_forwards() -> u64 {
    PLANNED_FORWARDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many recorded passes this process has replayed (0 without CUDA): for tests and logs.
pub fn graph_replays() -> u64 {
    #[cfg(feature = "cuda")]
    return crate::gpu::plan::replays();
    #[cfg(not(feature = "cuda"))]
    0
}

/// How many planned CUDA passes could not be recorded as graphs and run unrecorded since (0
/// without CUDA): for tests and logs.
pub fn unrecorded_passes() -> u64 {
    #[cfg(feature = "cuda")]
    return crate::gpu::plan::unrecorded_passes();
    #[cfg(not(feature = "cuda"))]
    0
}

/// How many channels-last convolution geometries cuDNN could not plan, so that the planned CUDA
/// step ran them as NCHW with transposed operands (0 without CUDA): for tests and logs.
pub fn transposed_convolutions() -> u64 {
    #[cfg(feature = "cuda")]
    return crate::gpu::conv::transposed_geometries();
    #[cfg(not(feature = "cuda"))]
    0
}

/// The plan of `program` for training on `device` with activations of `dtype`, where that
/// device has planned kernels: the CPU in f32; CUDA in f32 or bf16 (a `cuda` build), run as
/// `options` say.
pub fn plan(
    program: Program,
    device: &Device,
    dtype: DType,
    options: PlanOptions,
) -> Option<Box<dyn Planned>> {
    // Only CUDA reads the options.
    let _ = options;
    match device {
        Device::Cpu if dtype == DType::F32 => Some(Box::new(Plan::new(
            program,
            super::plan_cpu::CpuKernels,
            device.clone(),
            dtype,
        ))),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) if matches!(dtype, DType::F32 | DType::BF16) => {
            Some(Box::new(Plan::new(
                program,
                crate::gpu::plan::CudaKernels::new(dev.clone(), dtype, options),
                device.clone(),
                dtype,
            )))
        }
        _ => None,
    }
}

/// A plan made on first use (`None` until then, or when the images have no planned kernels).
type PlanSlot = Option<Box<dyn Planned>>;

/// A classifier built from a [`ModelSpec`].
pub struct Net {
    body: Box<dyn Backbone>,
    /// The backbone's planned training step, when switched on ([`Net::plan_training`]).
    plan: Option<Mutex<Box<dyn Planned>>>,
    /// The backbone's planned evaluation-mode passes, when switched on
    /// ([`Net::plan_inference`]): how they run, and the plan, made for the first images' type
    /// and remade if it changes.
    inference: Option<(PlanOptions, Mutex<PlanSlot>)>,
    dropout: Dropout,
    fc: Linear,
    classifier: &'static str,
}

impl Net {
    /// A classifier over `body`: `dropout`, then a `D → classes` linear layer whose variables
    /// are `<classifier>.weight` and `<classifier>.bias` under `vb` (see
    /// [`super::arch::build`]).
    pub fn new(
        body: Box<dyn Backbone>,
        dropout: Dropout,
        classes: usize,
        classifier: &'static str,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let fc = linear(body.feature_dim(), classes, vb.pp(classifier))?;
        Ok(Net {
            body,
            plan: None,
            inference: None,
            dropout,
            fc,
            classifier,
        })
    }

    /// Runs training-mode forward passes on images of type `dtype` through the backbone's
    /// planned program when `dtype` is given, the backbone has a program (every ResNet, with
    /// either stem, and ResNeXt) and its device has planned kernels (the CPU in f32; CUDA in f32 or
    /// bf16); whoever switches it on must take gradients with [`Net::backward`]. `None` switches
    /// it off. On CUDA the environment chooses how the passes run ([`PlanOptions::from_env`]:
    /// CUDA graphs under `LDL_GPU_GRAPH=1`, channels-last under `LDL_GPU_NHWC=1`). Returns
    /// whether the plan is in use.
    pub fn plan_training(&mut self, dtype: Option<DType>) -> bool {
        self.plan_training_with(dtype, PlanOptions::from_env())
    }

    /// [`Net::plan_training`], run as `options` say.
    pub fn plan_training_with(&mut self, dtype: Option<DType>, options: PlanOptions) -> bool {
        self.plan = dtype
            .and_then(|dtype| self.new_plan(dtype, options))
            .map(Mutex::new);
        self.plan.is_some()
    }

    /// A plan of the backbone on its weights' device for activations of `dtype`, where both
    /// exist.
    fn new_plan(&self, dtype: DType, options: PlanOptions) -> Option<Box<dyn Planned>> {
        let program = self.body.program()?;
        let device = program.stem.conv.weight().device().clone();
        plan(program, &device, dtype, options)
    }

    /// Runs evaluation-mode forward passes through the backbone's planned program when `on`
    /// and the backbone has one (a teacher applied to every batch: the same results as the
    /// layers give, on buffers reused from batch to batch; on CUDA run as
    /// [`PlanOptions::from_env`] says). Images of a type or device without planned kernels take
    /// the layers. Returns whether it is on.
    pub fn plan_inference(&mut self, on: bool) -> bool {
        self.plan_inference_with(on, PlanOptions::from_env())
    }

    /// [`Net::plan_inference`], run as `options` say.
    pub fn plan_inference_with(&mut self, on: bool, options: PlanOptions) -> bool {
        self.inference = (on && self.body.program().is_some()).then(|| (options, Mutex::new(None)));
        self.inference.is_some()
    }

    /// Frees the buffers of the planned evaluation-mode passes (they stay switched on, and the
    /// next pass makes them again): for a model evaluated now and then (a training's held-out
    /// evaluations, one of several teachers labelling in turn), whose buffers would otherwise
    /// stay allocated between its passes.
    pub fn release_inference(&self) {
        if let Some((_, slot)) = &self.inference {
            *slot.lock().expect("plan lock") = None;
        }
    }

    /// The backbone's output through a plan, when one takes `x` in this mode.
    fn planned_features(&self, x: &Tensor, train: bool) -> candle_core::Result<Option<Tensor>> {
        let y = match (&self.plan, &self.inference) {
            (Some(plan), _) if train => {
                let mut plan = plan.lock().expect("plan lock");
                plan.accepts(x).then(|| plan.forward(x)).transpose()?
            }
            (_, Some((options, inference))) if !train => {
                let mut slot = inference.lock().expect("plan lock");
                if slot.as_ref().is_none_or(|p| !p.accepts(x)) {
                    *slot = self.new_plan(x.dtype(), *options);
                }
                match slot.as_mut() {
                    Some(p) if p.accepts(x) => Some(p.infer(x)?),
                    _ => None,
                }
            }
            _ => None,
        };
        if y.is_some() {
            PLANNED_FORWARDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(y)
    }

    /// The gradients of `loss`, through the planned backbone for the forward passes that ran
    /// on it. Without a plan, `loss.backward()`.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        let mut grads = loss.backward()?;
        if let Some(plan) = &self.plan {
            plan.lock().expect("plan lock").backward(&mut grads)?;
        }
        Ok(grads)
    }

    /// Length D of the penultimate features.
    pub fn feature_dim(&self) -> usize {
        self.body.feature_dim()
    }

    /// The classifier's variable prefix: `fc` (torchvision's ResNets) or `linear`
    /// (kuangliu/pytorch-cifar's ResNeXt, DenseNet and DLA).
    pub fn classifier_name(&self) -> &'static str {
        self.classifier
    }

    /// The classifier's weight `K × D`: row k is class k's template (Müller et al. 2019).
    pub fn classifier_weight(&self) -> &Tensor {
        self.fc.weight()
    }

    /// Rate of the dropout before the classifier.
    pub fn dropout_rate(&self) -> f64 {
        self.dropout.rate()
    }

    /// Penultimate features `N × D`, after global average pooling and before dropout. An
    /// evaluation-mode pass (`train` false) reads the parameters detached ([`NoGrad`]): over
    /// plain images it records no autograd graph and frees each activation once it has been
    /// read, and the parameters get no gradient through it (nothing trains through one).
    pub fn features_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let _no_grad = (!train).then(NoGrad::enter);
        let mut y = match self.planned_features(x, train)? {
            Some(y) => y,
            None => self.body.forward_t(x, train)?,
        };
        // Reduced-precision (bf16) activations end here: pooling, the classifier and the loss
        // run in f32.
        if y.dtype() != candle_core::DType::F32 {
            y = y.to_dtype(candle_core::DType::F32)?;
        }
        y.mean(D::Minus1)?.mean(D::Minus1)
    }

    /// Logits from penultimate features (the classifier alone, no dropout); inside a
    /// [`NoGrad`] scope with the classifier's parameters detached.
    pub fn head(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        let bias = self.fc.bias().map(no_grad::param);
        Linear::new(no_grad::param(self.fc.weight()), bias).forward(features)
    }

    /// Logits from penultimate features through the dropout (active when `seed` is given, masks
    /// drawn from it) and the classifier: Monte-Carlo dropout resamples only this part, so the
    /// features of a batch are computed once for all of its passes. An evaluation pass, as
    /// [`Net::features_t`] with `train` false: the classifier is read detached.
    pub fn head_with_dropout(
        &self,
        features: &Tensor,
        seed: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        let _no_grad = NoGrad::enter();
        self.head(&self.dropout.forward(features, seed)?)
    }

    /// Penultimate features `N × D` (before dropout) and logits `N × K`; the logits are
    /// `dropout(features)·Wᵀ + b`, so `features·Wᵀ + b` whenever dropout is inactive. Outside
    /// training mode both read the parameters detached, as [`Net::features_t`] says.
    pub fn features_and_logits(
        &self,
        x: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let _no_grad = (!mode.train).then(NoGrad::enter);
        let features = self.features_t(x, mode.train)?;
        let logits = self.head(&self.dropout.forward(&features, mode.dropout_seed)?)?;
        Ok((features, logits))
    }

    /// Logits `N × K` in `mode`.
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        Ok(self.features_and_logits(x, mode)?.1)
    }

    /// Logits `N × K`; `train` selects batch statistics (and updates the running ones). Dropout
    /// is inactive; training a model with dropout needs a seed for its masks, so there it is an
    /// error: use [`Net::forward_mode`] with [`Mode::train`].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train && self.dropout.rate() > 0.0 {
            candle_core::bail!(
                "this model has dropout {}: training it needs a seed for the masks (forward_mode with Mode::train(seed))",
                self.dropout.rate()
            )
        }
        self.forward_mode(
            x,
            Mode {
                train,
                dropout_seed: None,
            },
        )
    }

    /// Logits `N × K` with Monte-Carlo dropout: running statistics, dropout active with masks
    /// drawn from `seed` (one seed per sample of the MC estimate).
    pub fn forward_mc(&self, x: &Tensor, seed: u64) -> candle_core::Result<Tensor> {
        self.forward_mode(x, Mode::mc(seed))
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu::REFERENCE_OPS;
    use super::super::{Model, ModelSpec, Shortcut};
    use crate::losses::cross_entropy;
    use crate::models::testing::{max_rel, random};
    use candle_core::{DType, Device, Tensor};

    /// Logits and the gradient of every trainable tensor of one training step, on this
    /// thread's ops.
    fn step(m: &Model, x: &Tensor, y: &Tensor) -> (Tensor, Vec<(String, Tensor)>) {
        let logits = m.net.forward_t(x, true).unwrap();
        let grads = m.net.backward(&cross_entropy(&logits, y).unwrap()).unwrap();
        let mut g: Vec<(String, Tensor)> = m
            .trainable()
            .into_iter()
            .map(|(name, v)| {
                let g = grads.get(v.as_tensor()).cloned();
                (
                    name.clone(),
                    g.unwrap_or_else(|| panic!("no gradient for `{name}`")),
                )
            })
            .collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        (logits, g)
    }

    /// Whole models, every architecture family the project trains on CPU: the logits and every
    /// parameter's gradient of a training step on our kernels (the planned step where the
    /// backbone has one) equal those of the same model on candle's reference ops (candle-nn's
    /// convolution, BatchNorm as tensor ops, `relu(a + b)`) within 2e-4 relative to each
    /// tensor's largest value. Each kernel alone agrees to 1e-5 (their own tests); through a
    /// whole network f32 rounding grows with depth (here at most 9e-5, ResNet-50, whose initial
    /// gradients reach 4.7), and far more where a BatchNorm channel is nearly constant over the
    /// batch (1/√(var + eps) up to 316 amplifies the last bits), or where a pre-activation lies
    /// within rounding of 0 so that the two f32 paths' ReLU masks differ at one position (DLA
    /// at width 4 and 16 × 16 pixels, width 8 and 32 × 32, after its initialisation became
    /// kuangliu's: one channel's bias gradient 4.5e-3 against −1.5e-4, with candle's f32
    /// agreeing with an f64 run that time, and ours when one 4 × 4 layer ran candle's
    /// convolution). The widths and sizes here are chosen so that neither happens; with widths
    /// of 2–4 DenseNet, DLA and ResNet-50 differed by 1e-2.
    #[test]
    fn whole_models_match_candle_reference_ops() {
        let cases: [(&str, usize, Shortcut, usize); 8] = [
            ("resnet8", 4, Shortcut::A, 8),
            ("resnet14", 4, Shortcut::B, 8),
            ("resnet18", 4, Shortcut::B, 16),
            ("resnet50", 8, Shortcut::B, 16),
            // The ImageNet stem: 7×7 stride-2 convolution and padded 3×3 stride-2 max-pool.
            ("resnet50_imagenet", 8, Shortcut::B, 64),
            ("resnext29_2x4d", 2, Shortcut::B, 8),
            ("densenet_cifar", 8, Shortcut::B, 16),
            ("dla", 8, Shortcut::B, 16),
        ];
        for (arch, width, shortcut, hw) in cases {
            let spec = ModelSpec {
                width,
                shortcut,
                ..ModelSpec::new(arch, 5, 3).unwrap()
            };
            let mut m = Model::new(&spec, &Device::Cpu, 3).unwrap();
            let x = random(&[8, 3, hw, hw], -2.0..2.0, 12);
            let y = Tensor::new(&[0u32, 1, 2, 4, 3, 1, 0, 2], &Device::Cpu).unwrap();
            m.net.plan_training(Some(candle_core::DType::F32));
            let (ours_logits, ours) = step(&m, &x, &y);
            m.net.plan_training(None);
            REFERENCE_OPS.with(|r| r.set(true));
            let (ref_logits, reference) = step(&m, &x, &y);
            REFERENCE_OPS.with(|r| r.set(false));
            let e = max_rel(&ours_logits, &ref_logits);
            assert!(e < 2e-4, "{arch}: logits differ by {e:e} relative");
            assert_eq!(ours.len(), reference.len());
            for ((name, a), (_, b)) in ours.iter().zip(&reference) {
                let e = max_rel(a, b);
                assert!(
                    e < 2e-4,
                    "{arch}: gradient of `{name}` differs by {e:e} relative"
                );
            }
        }
    }

    /// Evaluation-mode passes through the planned program give bitwise what the layers give,
    /// after two training steps have moved the weights and running statistics: batches of 5, 3
    /// and 5 images in turn (buffers sized, reused smaller, reused again), every one through
    /// the plan. Architectures without a program keep the layers.
    #[test]
    fn planned_inference_equals_the_layers_bitwise() {
        use crate::optim::{Sgd, SgdConfig};
        let cases = [
            ("resnet8", 4, Shortcut::A, 8),
            ("resnet14", 4, Shortcut::B, 8),
            ("resnet50", 2, Shortcut::B, 16),
            ("resnext29_2x4d", 2, Shortcut::B, 8),
            ("resnet18_imagenet", 4, Shortcut::B, 19),
        ];
        for (arch, width, shortcut, hw) in cases {
            let spec = ModelSpec {
                width,
                shortcut,
                ..ModelSpec::new(arch, 5, 3).unwrap()
            };
            let mut m = Model::new(&spec, &Device::Cpu, 9).unwrap();
            // Trained through the planned step, whose updates (weights, running statistics)
            // the planned evaluation passes must read.
            assert!(m.net.plan_training(Some(DType::F32)), "{arch}");
            let mut opt = Sgd::new(m.trainable(), SgdConfig::default());
            let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0], &Device::Cpu).unwrap();
            for s in 0..2 {
                let x = random(&[6, 3, hw, hw], -2.0..2.0, 40 + s);
                let loss = cross_entropy(&m.net.forward_t(&x, true).unwrap(), &y).unwrap();
                opt.step(&m.net.backward(&loss).unwrap(), 0.1).unwrap();
            }
            let batches: Vec<Tensor> = [5, 3, 5]
                .iter()
                .enumerate()
                .map(|(i, &n)| random(&[n, 3, hw, hw], -2.0..2.0, 50 + i as u64))
                .collect();
            let logits = |m: &Model, x: &Tensor| {
                let l = m.net.forward_t(x, false).unwrap();
                l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let layers: Vec<Vec<f32>> = batches.iter().map(|x| logits(&m, x)).collect();
            assert!(m.net.plan_inference(true), "{arch}");
            for (i, x) in batches.iter().enumerate() {
                assert!(
                    m.net.planned_features(x, false).unwrap().is_some(),
                    "{arch}: batch {i} through the plan"
                );
                assert_eq!(logits(&m, x), layers[i], "{arch}: batch {i}");
            }
            // Released buffers are made again, with the same results; and a training step in
            // between moves the planned evaluation as it moves the layers'.
            m.net.release_inference();
            assert_eq!(logits(&m, &batches[0]), layers[0], "{arch}: after release");
            let x = random(&[6, 3, hw, hw], -2.0..2.0, 60);
            let loss = cross_entropy(&m.net.forward_t(&x, true).unwrap(), &y).unwrap();
            opt.step(&m.net.backward(&loss).unwrap(), 0.1).unwrap();
            let planned = logits(&m, &batches[1]);
            assert!(!m.net.plan_inference(false));
            assert_eq!(planned, logits(&m, &batches[1]), "{arch}: after a step");
            assert_ne!(planned, layers[1], "{arch}: the step changed nothing");
        }
        for arch in ["densenet_cifar", "dla"] {
            let mut m = Model::new(&ModelSpec::new(arch, 5, 3).unwrap(), &Device::Cpu, 0).unwrap();
            assert!(!m.net.plan_inference(true), "{arch}");
        }
    }

    /// Evaluation-mode passes record no autograd graph (so they keep no activation alive past
    /// its use), through the layers (DenseNet, DLA, and a ResNet without its plan) and through
    /// the planned program, with Monte-Carlo dropout too; their logits after a training step
    /// agree with candle's reference ops in evaluation mode, and a training pass right after
    /// records its graph again, with a gradient for every parameter.
    #[test]
    fn evaluation_passes_record_no_graph() {
        use crate::optim::{Sgd, SgdConfig};
        let cases = [
            ("densenet_cifar", 8, 16, false),
            ("dla", 8, 16, false),
            ("resnet8", 4, 8, false),
            ("resnet8", 4, 8, true),
        ];
        for (arch, width, hw, planned) in cases {
            let spec = ModelSpec {
                width,
                dropout: 0.3,
                ..ModelSpec::new(arch, 5, 3).unwrap()
            };
            let mut m = Model::new(&spec, &Device::Cpu, 4).unwrap();
            assert_eq!(m.net.plan_inference(planned), planned, "{arch}");
            let mut opt = Sgd::new(m.trainable(), SgdConfig::default());
            let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0], &Device::Cpu).unwrap();
            let x = random(&[6, 3, hw, hw], -2.0..2.0, 70);
            let train = super::Mode::train(5);
            let loss = cross_entropy(&m.net.forward_mode(&x, train).unwrap(), &y).unwrap();
            assert!(loss.track_op(), "{arch}: the training pass records");
            opt.step(&m.net.backward(&loss).unwrap(), 0.1).unwrap();
            let logits = m.net.forward_t(&x, false).unwrap();
            let (features, mc) = m.net.features_and_logits(&x, super::Mode::mc(6)).unwrap();
            for (what, t) in [
                ("logits", &logits),
                ("features", &features),
                ("MC logits", &mc),
                ("features_t", &m.net.features_t(&x, false).unwrap()),
                (
                    "head_with_dropout",
                    &m.net.head_with_dropout(&features, Some(7)).unwrap(),
                ),
            ] {
                assert!(
                    !t.track_op(),
                    "{arch} (planned: {planned}): {what} record a graph"
                );
            }
            REFERENCE_OPS.with(|r| r.set(true));
            m.net.plan_inference(false);
            let reference = m.net.forward_t(&x, false).unwrap();
            REFERENCE_OPS.with(|r| r.set(false));
            let e = max_rel(&logits, &reference);
            assert!(
                e < 2e-4,
                "{arch}: evaluation logits differ by {e:e} relative"
            );
            let again = m.net.forward_mode(&x, train).unwrap();
            assert!(
                again.track_op(),
                "{arch}: training after evaluation records"
            );
            let grads = m.net.backward(&cross_entropy(&again, &y).unwrap()).unwrap();
            for (name, v) in m.trainable() {
                assert!(
                    grads.get(v.as_tensor()).is_some(),
                    "{arch}: no gradient for {name}"
                );
            }
        }
    }
}
