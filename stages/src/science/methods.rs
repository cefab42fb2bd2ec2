//! The training methods of the paper (its Fig. 2 configurations #1–#9) and its baselines, by
//! name, with what each needs: stored labels, teachers, OGR weights. How each supervises a
//! student is in [`super::supervision`]; every formula in docs/methods.md.

use serde::{Deserialize, Serialize};

/// How the student is supervised (`method = "..."` of a train stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Cross-entropy on the hard (or mixed hard) labels: configuration #1, "Vanilla".
    Vanilla,
    /// Label smoothing, eq. (2) (#2).
    Ls,
    /// Knowledge distillation (Hinton et al.): (1 − λ)·CE + λ·τ²·KL (#3).
    Kd,
    /// Weighted soft labels (Zhou et al., ICLR 2021).
    Wsl,
    /// Offline LDL: soft cross-entropy on one stored teacher distribution (#4).
    OffLdl,
    /// Offline ensemble LDL: on the stored mean of the teachers (#5).
    OffEnLdl,
    /// Offline multi-teacher LDL: the sum of the soft cross-entropies with each stored teacher
    /// distribution (#6).
    OffMtLdl,
    /// Online LDL: the teacher labels each augmented batch (#7).
    OnLdl,
    /// Online ensemble LDL: the mean of the teachers' distributions on each batch (#8).
    OnEnLdl,
    /// Online multi-teacher LDL: the sum of the soft cross-entropies with each teacher (#9).
    OnMtLdl,
    /// OGR as a class-wise loss weight (supplement §6).
    OgrLoss,
    /// OGR as a label distribution built from the one-hot label (supplement §6).
    OgrLdl,
    /// Contrastive representation distillation (Tian et al., ICLR 2020): CE + β·CRD.
    Crd,
    /// CRD with the KD term: CE + α·τ²·KL + β·CRD (RepDistiller's `-a 1 -b 0.8`).
    CrdKd,
    /// SSKD's first phase: trains the self-supervised projection head of a frozen teacher on
    /// the four rotations of each image (its output is the teacher with the head).
    SskdHead,
    /// Self-supervised knowledge distillation (Xu et al., ECCV 2020) from an `sskd-head` stage.
    Sskd,
}

impl Method {
    /// Every method, in the order of docs/methods.md.
    pub const ALL: [Method; 16] = [
        Method::Vanilla,
        Method::Ls,
        Method::Kd,
        Method::Wsl,
        Method::OffLdl,
        Method::OffEnLdl,
        Method::OffMtLdl,
        Method::OnLdl,
        Method::OnEnLdl,
        Method::OnMtLdl,
        Method::OgrLoss,
        Method::OgrLdl,
        Method::Crd,
        Method::CrdKd,
        Method::SskdHead,
        Method::Sskd,
    ];

    /// The method's name in stages.toml.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Vanilla => "vanilla",
            Method::Ls => "ls",
            Method::Kd => "kd",
            Method::Wsl => "wsl",
            Method::OffLdl => "off-ldl",
            Method::OffEnLdl => "off-en-ldl",
            Method::OffMtLdl => "off-mt-ldl",
            Method::OnLdl => "on-ldl",
            Method::OnEnLdl => "on-en-ldl",
            Method::OnMtLdl => "on-mt-ldl",
            Method::OgrLoss => "ogr-loss",
            Method::OgrLdl => "ogr-ldl",
            Method::Crd => "crd",
            Method::CrdKd => "crd-kd",
            Method::SskdHead => "sskd-head",
            Method::Sskd => "sskd",
        }
    }

    /// The method named by `name` as in stages.toml (`"off-ldl"`).
    pub fn parse(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// The method's name in the paper's tables (`Off-LDL`); `OGR` and `OGR-LDL` for the
    /// supplement's two uses of OGR.
    pub fn paper_name(&self) -> &'static str {
        match self {
            Method::Vanilla => "Vanilla",
            Method::Ls => "LS",
            Method::Kd => "KD",
            Method::Wsl => "WSL",
            Method::OffLdl => "Off-LDL",
            Method::OffEnLdl => "Off-En-LDL",
            Method::OffMtLdl => "Off-MT-LDL",
            Method::OnLdl => "On-LDL",
            Method::OnEnLdl => "On-En-LDL",
            Method::OnMtLdl => "On-MT-LDL",
            Method::OgrLoss => "OGR",
            Method::OgrLdl => "OGR-LDL",
            Method::Crd => "CRD",
            Method::CrdKd => "CRD+KD",
            Method::SskdHead => "SSKD head",
            Method::Sskd => "SSKD",
        }
    }

    /// Whether the method reads a label store (the offline methods).
    pub fn reads_labels(&self) -> bool {
        matches!(self, Method::OffLdl | Method::OffEnLdl | Method::OffMtLdl)
    }

    /// How many of its `available` teachers the method runs: all for the ensembles, else the
    /// first (see [`Method::uses_teachers`]).
    pub fn teachers_run(&self, available: usize) -> usize {
        match self {
            Method::OnEnLdl | Method::OnMtLdl => available,
            _ => available.min(1),
        }
    }

    /// Whether the method runs teacher models (train stages in `needs`). `kd`, `wsl`, `on-ldl`,
    /// `crd`, `crd-kd` and `sskd` run one teacher, the first train stage in `needs` (so that one
    /// grid over methods can list the teachers of its ensemble cells); the ensemble methods run
    /// all of them; `sskd-head` needs exactly one, the teacher it trains a head for.
    pub fn uses_teachers(&self) -> bool {
        matches!(
            self,
            Method::Kd
                | Method::Wsl
                | Method::OnLdl
                | Method::OnEnLdl
                | Method::OnMtLdl
                | Method::Crd
                | Method::CrdKd
                | Method::SskdHead
                | Method::Sskd
        )
    }

    /// Whether the method distils the teacher's penultimate features (CRD, SSKD), not only its
    /// outputs: it needs the student's features, unmixed batches, and the teacher itself (a
    /// replay store keeps outputs only).
    pub fn uses_features(&self) -> bool {
        matches!(self, Method::Crd | Method::CrdKd | Method::Sskd)
    }

    /// Whether the method is CRD (with or without KD): a memory bank indexed by dataset image.
    pub fn is_crd(&self) -> bool {
        matches!(self, Method::Crd | Method::CrdKd)
    }

    /// Whether the method trains on each image's four rotations (SSKD's two phases).
    pub fn uses_rotations(&self) -> bool {
        matches!(self, Method::SskdHead | Method::Sskd)
    }

    /// Whether the method needs per-class OGR weights (and so a validation split).
    pub fn uses_ogr(&self) -> bool {
        matches!(self, Method::OgrLoss | Method::OgrLdl)
    }
}

/// How the per-teacher terms of the multi-teacher methods are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeacherReduction {
    /// Σ_n (the paper's formula for #6 and #9).
    #[default]
    Sum,
    /// (1/N) Σ_n.
    Mean,
}
