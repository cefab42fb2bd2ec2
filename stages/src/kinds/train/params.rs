//! The parameters of a `train` stage: every key of its stages.toml table, their defaults, the
//! checks of their ranges, and what a grid cell's method leaves unused.

use crate::params;
use crate::science::methods::{Method, TeacherReduction};
use crate::science::supervision::SupervisionConfig;
use datasets::mix::Mix;
use engine::device::Precision;
use engine::models::{Arch, Shortcut, Stem};
use engine::schedule::Schedule;
use serde::{Deserialize, Serialize};

pub use crate::stream::AugmentName;
use crate::stream::BatchStream;

/// Parameters of a `train` stage; defaults (the paper's CIFAR settings) are in its `Default`
/// impl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
pub struct Params {
    /// Architecture: a CIFAR ResNet `resnet<6n+2>`, `resnet18` … `resnet200`, an `_imagenet`
    /// variant, `resnext29_<C>x<d>d`, a DenseNet (`densenet121`, ...) or `dla` (see
    /// [`engine::models::Arch`]).
    pub model: String,
    /// The architecture's scale (default: the reference network's, filled in by `resolve`;
    /// see [`engine::models::Arch::default_width`]).
    pub width: Option<usize>,
    /// Shortcut option of the CIFAR ResNets.
    pub shortcut: Shortcut,
    /// Stem of resnet18 … resnet200: `"cifar"` (3×3 conv) or `"imagenet"` (7×7/2 conv + max-pool).
    pub stem: Stem,
    /// Dropout rate before the classifier (0: none).
    pub dropout: f64,
    /// Training method (docs/methods.md).
    pub method: Method,
    /// For `off-ldl`: which source of the label store to learn from, e.g. a teacher's name or
    /// `<teacher>.mc` for its Monte-Carlo dropout labels (default: the store's only teacher).
    pub label_source: Option<String>,
    /// `ls`: the smoothing mass α.
    pub ls_alpha: f64,
    /// `ls`: `"paper"` (eq. 2: α/(K − 1) on each other class) or `"uniform"` (α/K on every class).
    pub ls_convention: engine::losses::SmoothingConvention,
    /// `kd`: weight λ of the distillation term.
    pub kd_lambda: f64,
    /// `kd`: temperature τ.
    pub kd_tau: f64,
    /// `kd`: `"batchmean"` (KL summed over classes) or `"mean"` (averaged over classes, as
    /// PyTorch's `KLDivLoss()` default; reportedly the paper's code).
    pub kd_reduction: engine::losses::KdReduction,
    /// `kd`: multiply the KL term by τ² (Hinton et al.; RepDistiller), or not (`false`: the
    /// paper's §3.1 formula as printed).
    pub kd_tau_squared: bool,
    /// `wsl`: weight α of the soft term.
    pub wsl_alpha: f64,
    /// `wsl`: temperature τ.
    pub wsl_tau: f64,
    /// `off-mt-ldl`, `on-mt-ldl`: `"sum"` (the paper) or `"mean"` of the per-teacher terms.
    pub mt_reduction: TeacherReduction,
    /// Online methods: label each batch with the mean of this many Monte-Carlo dropout passes
    /// of the teacher (0: its deterministic softmax); "MCDO-T".
    pub teacher_mc: usize,
    /// `ogr-loss`, `ogr-ldl`: epochs between OGR measurements (n).
    pub ogr_every: usize,
    /// `ogr-ldl`: the mass α spread by the OGR weights.
    pub ogr_alpha: f64,
    /// `crd`, `crd-kd`: weight β of the contrastive term (RepDistiller's `-b`).
    pub crd_beta: f64,
    /// `crd-kd`: weight α of the KD term (RepDistiller's `-a`).
    pub crd_kd_alpha: f64,
    /// `crd-kd`: temperature τ of the KD term (RepDistiller's `--kd_T`).
    pub crd_kd_tau: f64,
    /// `crd`, `crd-kd`: embedding dimension (`--feat_dim`).
    pub crd_dim: usize,
    /// `crd`, `crd-kd`: negatives per image (`--nce_k`).
    pub crd_negatives: usize,
    /// `crd`, `crd-kd`: temperature of the scores (`--nce_t`).
    pub crd_temperature: f64,
    /// `crd`, `crd-kd`: momentum of the memory update (`--nce_m`).
    pub crd_momentum: f64,
    /// `sskd`: weight of the cross-entropy on the originals (the reference's `--ce-weight`).
    pub sskd_ce_weight: f64,
    /// `sskd`: weight of the KD term on the originals (`--kd-weight`).
    pub sskd_kd_weight: f64,
    /// `sskd`: weight of the KD term on the rotated views (`--tf-weight`).
    pub sskd_tf_weight: f64,
    /// `sskd`: weight of the self-supervised similarity term (`--ss-weight`).
    pub sskd_ss_weight: f64,
    /// `sskd`: temperature of the KD term (`--kd-T`).
    pub sskd_kd_tau: f64,
    /// `sskd`: temperature of the rotated views' term (`--tf-T`).
    pub sskd_tf_tau: f64,
    /// `sskd`: temperature of the similarity term (`--ss-T`).
    pub sskd_ss_tau: f64,
    /// `sskd`: fraction of the rotated views the teacher misclassifies that are kept (`--ratio-tf`).
    pub sskd_ratio_tf: f64,
    /// `sskd`: fraction of the similarity rows the teacher ranks wrongly that are kept (`--ratio-ss`).
    pub sskd_ratio_ss: f64,
    /// After training, fit a temperature T on the validation split (minimising NLL) and store
    /// it with the model (`temperature.json`); evaluate then reports calibrated metrics too.
    pub temperature_scaling: bool,
    /// Every this many epochs (and after the last), evaluate the model on the held-out split
    /// (`val` when the dataset has one, else `test`) and log its NLL, accuracy and ECE in
    /// `train_log.csv` (0: never). Training is unaffected: the weights are the same either way.
    pub eval_every: usize,
    /// Epochs.
    pub epochs: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Epochs of linear warm-up.
    pub warmup_epochs: usize,
    /// Per-image augmentation.
    pub augment: AugmentName,
    /// Side of the square the model sees: the output of `augment = "random-resized-crop"`,
    /// else the centre square of each packed image (in training and in evaluation).
    pub crop_size: Option<usize>,
    /// Range of a random resized crop's area, as a fraction of the image's.
    pub crop_scale: [f64; 2],
    /// Range of a random resized crop's aspect ratio (width / height).
    pub crop_ratio: [f64; 2],
    /// Side of a Cutout square applied after normalisation (0: none).
    pub cutout: usize,
    /// Batch-level mixing, e.g. `{ type = "cutmix", p = 1.0 }`: the targets (one-hot or the
    /// stored distributions) are mixed with the images' weights.
    pub mix: Mix,
    /// Also checkpoint every this many steps (batches), besides the end of every epoch.
    pub checkpoint_every: Option<usize>,
    /// How many of the newest checkpoints to keep while training (they are removed once the
    /// stage finishes).
    pub keep_checkpoints: usize,
    /// Batches each loader worker may build ahead of the trainer (loader workers = `[run].threads`).
    pub prefetch: usize,
    /// Seed of initialisation and of dropout (default: the run's seed); also of the batch stream
    /// unless `data_seed` is set.
    pub seed: Option<u64>,
    /// Seed of the batch stream — order, augmentation, mixing, Monte-Carlo teacher masks —
    /// (default: `seed`): students of different seeds with one `data_seed` see the same
    /// batches, and can share one replay store.
    pub data_seed: Option<u64>,
    /// Read the teachers' outputs from the `replay` stage in `needs` instead of running the
    /// teachers (`kd`, `wsl`, `on-*`): it must hold this training's batch stream.
    pub replay: bool,
    /// Arithmetic of the convolutions and activations: `"f32"`, or `"bf16"` (CUDA only) with f32
    /// master weights, optimizer state, BatchNorm statistics, classifier and loss.
    pub dtype: Precision,
    /// The row name of this training in reports (default: the method's paper name with what
    /// tells the report's rows apart). Not fingerprinted: renaming a row retrains nothing.
    pub label: Option<String>,
}

impl Default for Params {
    /// The paper's CIFAR settings; the methods' own keys default to the paper's values
    /// ([`SupervisionConfig::default`]).
    fn default() -> Self {
        let m = SupervisionConfig::default();
        Params {
            model: "resnet20".into(),
            width: None,
            shortcut: Shortcut::default(),
            stem: Stem::default(),
            dropout: 0.0,
            // A placeholder: `method` is required (`REQUIRED`).
            method: m.method,
            label_source: None,
            ls_alpha: m.ls_alpha,
            ls_convention: m.ls_convention,
            kd_lambda: m.kd_lambda,
            kd_tau: m.kd_tau,
            kd_reduction: m.kd_reduction,
            kd_tau_squared: m.kd_tau_squared,
            wsl_alpha: m.wsl_alpha,
            wsl_tau: m.wsl_tau,
            mt_reduction: m.mt_reduction,
            teacher_mc: m.teacher_mc,
            ogr_every: 10,
            ogr_alpha: m.ogr_alpha,
            crd_beta: m.crd_beta,
            crd_kd_alpha: m.crd_kd_alpha,
            crd_kd_tau: m.crd_kd_tau,
            crd_dim: m.crd.dim,
            crd_negatives: m.crd.negatives,
            crd_temperature: m.crd.temperature,
            crd_momentum: m.crd.momentum,
            sskd_ce_weight: m.sskd.ce_weight,
            sskd_kd_weight: m.sskd.kd_weight,
            sskd_tf_weight: m.sskd.tf_weight,
            sskd_ss_weight: m.sskd.ss_weight,
            sskd_kd_tau: m.sskd.kd_tau,
            sskd_tf_tau: m.sskd.tf_tau,
            sskd_ss_tau: m.sskd.ss_tau,
            sskd_ratio_tf: m.sskd.ratio_tf,
            sskd_ratio_ss: m.sskd.ratio_ss,
            temperature_scaling: false,
            eval_every: 0,
            epochs: 240,
            batch_size: 64,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
            schedule: Schedule::MultiStep {
                milestones: vec![150, 180, 210],
                gamma: 0.1,
            },
            warmup_epochs: 0,
            augment: AugmentName::CropFlip,
            crop_size: None,
            crop_scale: crate::stream::CROP_SCALE,
            crop_ratio: crate::stream::CROP_RATIO,
            cutout: 0,
            mix: Mix::None {},
            checkpoint_every: None,
            keep_checkpoints: 1,
            prefetch: 2,
            seed: None,
            data_seed: None,
            replay: false,
            dtype: Precision::default(),
            label: None,
        }
    }
}

// Keys added after the first release, left out at their defaults so that adding them
// changed no existing stage's fingerprint.
params::stage_params! {
    Params,
    omitted: [
        "width",
        "stem",
        "dropout",
        "ls_alpha",
        "ls_convention",
        "kd_lambda",
        "kd_tau",
        "kd_reduction",
        "kd_tau_squared",
        "wsl_alpha",
        "wsl_tau",
        "mt_reduction",
        "teacher_mc",
        "ogr_every",
        "ogr_alpha",
        "temperature_scaling",
        "eval_every",
        "crop_size",
        "crop_scale",
        "crop_ratio",
        "cutout",
        "mix",
        "checkpoint_every",
        "keep_checkpoints",
        "prefetch",
        "dtype",
        "label",
        "data_seed",
        "replay",
        "crd_beta",
        "crd_kd_alpha",
        "crd_kd_tau",
        "crd_dim",
        "crd_negatives",
        "crd_temperature",
        "crd_momentum",
        "sskd_ce_weight",
        "sskd_kd_weight",
        "sskd_tf_weight",
        "sskd_ss_weight",
        "sskd_kd_tau",
        "sskd_tf_tau",
        "sskd_ss_tau",
        "sskd_ratio_tf",
        "sskd_ratio_ss",
    ],
    required: ["method"],
}

impl Params {
    /// The seed of the batch stream: `data_seed`, else `seed`.
    pub fn data_seed(&self) -> u64 {
        self.data_seed.or(self.seed).unwrap_or_default()
    }

    /// The training's batch stream.
    pub fn stream(&self) -> BatchStream {
        BatchStream {
            batch_size: self.batch_size,
            augment: self.augment,
            cutout: self.cutout,
            mix: self.mix,
            data_seed: self.data_seed(),
            rotations: self.method.uses_rotations(),
            view: crate::stream::training_view(
                self.augment,
                self.crop_size,
                self.crop_scale,
                self.crop_ratio,
            ),
        }
    }

    /// The training's distinguishing options, for table rows: mixing, Cutout, MC teachers.
    pub fn variant(&self) -> String {
        let mut tags = Vec::new();
        if self.mix != (Mix::None {}) {
            tags.push(self.mix.as_str().to_string());
        }
        if self.cutout > 0 {
            tags.push("cutout".into());
        }
        if self.teacher_mc > 0 {
            tags.push("MCDO-T".into());
        }
        tags.join(", ")
    }

    /// Puts the keys the method does not use back to their defaults, so that they are neither
    /// fingerprinted nor recorded: a grid over methods sharing one stage body (with, say,
    /// `kd_tau` for its `kd` cells) does not retrain its `vanilla` cells when `kd_tau` changes.
    pub fn clear_unused(&mut self) {
        let (m, d) = (self.method, Params::default());
        if m != Method::OffLdl {
            self.label_source = d.label_source;
        }
        if m != Method::Ls {
            self.ls_alpha = d.ls_alpha;
            self.ls_convention = d.ls_convention;
        }
        if m != Method::Kd {
            self.kd_lambda = d.kd_lambda;
            self.kd_tau = d.kd_tau;
            self.kd_reduction = d.kd_reduction;
            self.kd_tau_squared = d.kd_tau_squared;
        }
        if m != Method::Wsl {
            self.wsl_alpha = d.wsl_alpha;
            self.wsl_tau = d.wsl_tau;
        }
        if !matches!(m, Method::OffMtLdl | Method::OnMtLdl) {
            self.mt_reduction = d.mt_reduction;
        }
        if !matches!(m, Method::OnLdl | Method::OnEnLdl | Method::OnMtLdl) {
            self.teacher_mc = d.teacher_mc;
        }
        if !m.uses_ogr() {
            self.ogr_every = d.ogr_every;
        }
        if !m.uses_teachers() {
            self.replay = d.replay;
        }
        if m != Method::OgrLdl {
            self.ogr_alpha = d.ogr_alpha;
        }
        if !m.is_crd() {
            self.crd_beta = d.crd_beta;
            self.crd_dim = d.crd_dim;
            self.crd_negatives = d.crd_negatives;
            self.crd_temperature = d.crd_temperature;
            self.crd_momentum = d.crd_momentum;
        }
        if m != Method::CrdKd {
            self.crd_kd_alpha = d.crd_kd_alpha;
            self.crd_kd_tau = d.crd_kd_tau;
        }
        if m != Method::Sskd {
            self.clear_sskd();
        }
        if m == Method::SskdHead {
            // The head's network is its teacher, whose model.json says what it is.
            (self.model, self.width) = (d.model, d.width);
            (self.shortcut, self.stem, self.dropout) = (d.shortcut, d.stem, d.dropout);
        }
    }

    /// Puts SSKD's keys back to their defaults.
    fn clear_sskd(&mut self) {
        let d = Params::default();
        self.sskd_ce_weight = d.sskd_ce_weight;
        self.sskd_kd_weight = d.sskd_kd_weight;
        self.sskd_tf_weight = d.sskd_tf_weight;
        self.sskd_ss_weight = d.sskd_ss_weight;
        self.sskd_kd_tau = d.sskd_kd_tau;
        self.sskd_tf_tau = d.sskd_tf_tau;
        self.sskd_ss_tau = d.sskd_ss_tau;
        self.sskd_ratio_tf = d.sskd_ratio_tf;
        self.sskd_ratio_ss = d.sskd_ratio_ss;
    }

    /// Fills what is left to the run (the seed) and the architecture's width, and clears the
    /// keys the method does not use.
    pub fn resolve(&mut self, run_seed: u64) {
        self.seed.get_or_insert(run_seed);
        self.clear_unused();
        if self.width.is_none() && self.method != Method::SskdHead {
            if let Ok(arch) = Arch::parse(&self.model) {
                self.width = Some(arch.default_width());
            }
        }
    }

    /// Checks value ranges that the types alone do not; on error returns the offending key and
    /// what was expected.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        use params::{at_least, below_one, positive};
        let arch = Arch::parse(&self.model).map_err(|e| ("model", e.to_string()))?;
        arch.check(self.stem, self.shortcut)
            .map_err(|(key, why)| (key, format!("`{}`: {why}", self.model)))?;
        below_one("dropout", self.dropout)?;
        at_least("width", self.width.unwrap_or(1), 1)?;
        at_least("checkpoint_every", self.checkpoint_every.unwrap_or(1), 1)?;
        at_least("keep_checkpoints", self.keep_checkpoints, 1)?;
        at_least("prefetch", self.prefetch, 1)?;
        at_least("epochs", self.epochs, 1)?;
        at_least("batch_size", self.batch_size, 1)?;
        positive("lr", self.lr)?;
        below_one("momentum", self.momentum)?;
        non_negative("weight_decay", self.weight_decay)?;
        if self.warmup_epochs > self.epochs {
            return Err((
                "warmup_epochs",
                format!(
                    "{} is more than the {} epochs",
                    self.warmup_epochs, self.epochs
                ),
            ));
        }
        if let Schedule::MultiStep { milestones, gamma } = &self.schedule {
            if milestones.windows(2).any(|w| w[0] >= w[1]) {
                return Err((
                    "schedule",
                    format!("`milestones` must increase, found {milestones:?}"),
                ));
            }
            if !(gamma.is_finite() && *gamma > 0.0) {
                return Err((
                    "schedule",
                    format!("`gamma` must be a number > 0, found {gamma}"),
                ));
            }
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err((
                "nesterov",
                "needs `momentum` > 0 (with none it would be plain SGD; PyTorch refuses it too)"
                    .into(),
            ));
        }
        self.mix
            .validate()
            .map_err(|(key, msg)| ("mix", format!("`{key}` {msg}")))?;
        crate::stream::check_crop(
            self.augment,
            self.crop_size,
            self.crop_scale,
            self.crop_ratio,
        )?;
        below_one("ls_alpha", self.ls_alpha)?;
        below_one("ogr_alpha", self.ogr_alpha)?;
        if !(0.0..=1.0).contains(&self.kd_lambda) {
            return Err((
                "kd_lambda",
                format!("must be in [0, 1], found {}", self.kd_lambda),
            ));
        }
        positive("kd_tau", self.kd_tau)?;
        positive("wsl_tau", self.wsl_tau)?;
        non_negative("wsl_alpha", self.wsl_alpha)?;
        if self.label.as_deref().is_some_and(|l| l.trim().is_empty()) {
            return Err(("label", "must not be empty".into()));
        }
        self.validate_features()?;
        at_least("ogr_every", self.ogr_every, 1)
    }

    /// What CRD and SSKD cannot train with — mixed batches (CRD's memories are indexed by image,
    /// SSKD's similarities by original) and a replay store (which keeps the teacher's outputs,
    /// not its features) — and their keys' ranges.
    fn validate_features(&self) -> Result<(), (&'static str, String)> {
        let m = self.method.as_str();
        if !(self.method.uses_features() || self.method.uses_rotations()) {
            return Ok(());
        }
        if self.mix != (Mix::None {}) {
            return Err((
                "mix",
                format!("`{m}` trains on unmixed batches: its losses compare each training image with its own rows"),
            ));
        }
        if self.replay {
            return Err((
                "replay",
                format!("`{m}` distils the teacher's penultimate features, which a replay store does not keep: run the teacher (leave `replay` out)"),
            ));
        }
        if self.method == Method::SskdHead && self.eval_every > 0 {
            return Err((
                "eval_every",
                "`sskd-head` trains a projection head, not a classifier: evaluate the student"
                    .into(),
            ));
        }
        if self.method == Method::SskdHead && self.temperature_scaling {
            return Err((
                "temperature_scaling",
                "`sskd-head` trains a projection head, not a classifier: scale the student's temperature".into(),
            ));
        }
        if self.method.is_crd() {
            self.validate_crd()?;
        }
        if self.method == Method::Sskd {
            self.validate_sskd()?;
        }
        Ok(())
    }

    /// CRD's keys.
    fn validate_crd(&self) -> Result<(), (&'static str, String)> {
        use params::{at_least, below_one, positive};
        for (key, v) in [
            ("crd_beta", self.crd_beta),
            ("crd_kd_alpha", self.crd_kd_alpha),
        ] {
            non_negative(key, v)?;
        }
        positive("crd_kd_tau", self.crd_kd_tau)?;
        positive("crd_temperature", self.crd_temperature)?;
        below_one("crd_momentum", self.crd_momentum)?;
        at_least("crd_dim", self.crd_dim, 1)?;
        at_least("crd_negatives", self.crd_negatives, 1)
    }

    /// SSKD's keys.
    fn validate_sskd(&self) -> Result<(), (&'static str, String)> {
        for (key, v) in [
            ("sskd_ce_weight", self.sskd_ce_weight),
            ("sskd_kd_weight", self.sskd_kd_weight),
            ("sskd_tf_weight", self.sskd_tf_weight),
            ("sskd_ss_weight", self.sskd_ss_weight),
        ] {
            non_negative(key, v)?;
        }
        params::positive("sskd_kd_tau", self.sskd_kd_tau)?;
        params::positive("sskd_tf_tau", self.sskd_tf_tau)?;
        params::positive("sskd_ss_tau", self.sskd_ss_tau)?;
        for (key, v) in [
            ("sskd_ratio_tf", self.sskd_ratio_tf),
            ("sskd_ratio_ss", self.sskd_ratio_ss),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err((key, format!("must be in [0, 1], found {v}")));
            }
        }
        Ok(())
    }
}

/// `key`'s value must be finite and ≥ 0.
fn non_negative(key: &'static str, v: f64) -> Result<(), (&'static str, String)> {
    if v >= 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err((key, format!("must be ≥ 0, found {v}")))
    }
}
