//! DLA (Yu et al., "Deep Layer Aggregation", 2018) as kuangliu/pytorch-cifar defines it
//! (`models/dla.py`), the paper's Table 5 student `dla` (16.29 M parameters at 10 classes): a
//! base and two 3×3 convolution layers, then four aggregation trees of basic blocks (levels 1,
//! 2, 2, 1; strides 1, 2, 2, 2). A tree's root concatenates the outputs it aggregates and
//! applies a 1×1 convolution, BatchNorm and ReLU. With base width w the stages have w, w, 2w,
//! 4w, 8w, 16w and 32w channels (w = 16 in the reference). Variable names are kuangliu's
//! (`base.0`, `layer3.root.conv`, `layer4.level_1.left_node.conv1`, `prev_root`, `linear`).

use super::basic::{bn, conv, BasicBlock};
use super::batch_norm::BatchNorm;
use super::conv::Conv2d;
use super::net::Backbone;
use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// A 3×3 convolution + BatchNorm + ReLU whose variables are `<vb>.0` and `<vb>.1` (an
/// `nn.Sequential`).
struct ConvLayer {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvLayer {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        Ok(ConvLayer {
            conv: conv(cin, cout, 3, 1, vb.pp("0"))?,
            bn: bn(cout, vb.pp("1"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.bn.forward_relu_t(&self.conv.forward(x)?, train)
    }
}

/// An aggregation tree.
struct Tree {
    root_conv: Conv2d,
    root_bn: BatchNorm,
    /// `level_{level-1}` … `level_1`, in the order they run.
    subtrees: Vec<Tree>,
    /// The block whose output joins the root directly (levels above 1).
    prev_root: Option<BasicBlock>,
    left: BasicBlock,
    right: BasicBlock,
}

impl Tree {
    fn new(cin: usize, cout: usize, level: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let root_in = if level == 1 { 2 } else { level + 2 } * cout;
        let (subtrees, prev_root, left_in) = if level == 1 {
            (Vec::new(), None, cin)
        } else {
            // As in the reference, every subtree is built for the tree's own input (which is
            // what it receives at level 2, the deepest level DLA uses).
            let subtrees = (1..level)
                .rev()
                .map(|i| Tree::new(cin, cout, i, stride, vb.pp(format!("level_{i}"))))
                .collect::<Result<Vec<_>>>()?;
            let prev = BasicBlock::kuangliu(cin, cout, stride, vb.pp("prev_root"))?;
            (subtrees, Some(prev), cout)
        };
        let left_stride = if level == 1 { stride } else { 1 };
        Ok(Tree {
            root_conv: conv(root_in, cout, 1, 1, vb.pp("root.conv"))?,
            root_bn: bn(cout, vb.pp("root.bn"))?,
            subtrees,
            prev_root,
            left: BasicBlock::kuangliu(left_in, cout, left_stride, vb.pp("left_node"))?,
            right: BasicBlock::kuangliu(cout, cout, 1, vb.pp("right_node"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut xs = Vec::with_capacity(self.subtrees.len() + 3);
        if let Some(p) = &self.prev_root {
            xs.push(p.forward_t(x, train)?);
        }
        let mut y = x.clone();
        for t in &self.subtrees {
            y = t.forward_t(&y, train)?;
            xs.push(y.clone());
        }
        y = self.left.forward_t(&y, train)?;
        xs.push(y.clone());
        y = self.right.forward_t(&y, train)?;
        xs.push(y);
        let joined = Tensor::cat(&xs, 1)?;
        self.root_bn
            .forward_relu_t(&self.root_conv.forward(&joined)?, train)
    }
}

/// DLA up to its last feature maps.
pub struct Dla {
    base: ConvLayer,
    layer1: ConvLayer,
    layer2: ConvLayer,
    trees: Vec<Tree>,
    feature_dim: usize,
}

impl Dla {
    /// Base width `w`, images of `in_channels`; variables under `vb`.
    pub fn new(w: usize, in_channels: usize, vb: &VarBuilder) -> Result<Self> {
        let trees = [(2, 4, 1, 1), (4, 8, 2, 2), (8, 16, 2, 2), (16, 32, 1, 2)]
            .into_iter()
            .enumerate()
            .map(|(i, (cin, cout, level, stride))| {
                Tree::new(
                    cin * w,
                    cout * w,
                    level,
                    stride,
                    vb.pp(format!("layer{}", i + 3)),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Dla {
            base: ConvLayer::new(in_channels, w, vb.pp("base"))?,
            layer1: ConvLayer::new(w, w, vb.pp("layer1"))?,
            layer2: ConvLayer::new(w, 2 * w, vb.pp("layer2"))?,
            trees,
            feature_dim: 32 * w,
        })
    }
}

impl Backbone for Dla {
    fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut y = self.base.forward_t(x, train)?;
        y = self.layer1.forward_t(&y, train)?;
        y = self.layer2.forward_t(&y, train)?;
        for t in &self.trees {
            y = t.forward_t(&y, train)?;
        }
        Ok(y)
    }
}
