//! The CUDA training path against the CPU implementation, on random inputs: cuDNN convolutions,
//! fused BatchNorm (+ ReLU), residual add + ReLU, the stem's max-pooling, the SGD step, and a few training steps of a
//! whole ResNet, CRD's constant products and a DenseNet evaluation pass, each in f32 (relative error < 1e-4) and bf16 (< 1e-2, against the CPU on the
//! same bf16-rounded inputs).
//!
//! Compiled in every build; each test runs where a CUDA device is present (a build with the
//! `cuda` feature on a machine with a GPU) and otherwise says it skipped and passes: CI has no
//! GPU. `scripts/gpu-bench.sh` runs them on the GPU machine.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use engine::models::add_relu::add_relu;
use engine::models::batch_norm::BatchNorm;
use engine::models::conv::Conv2d;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// The first CUDA device, or `None` (printed) when this build or machine has none.
fn cuda(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("{test}: skipped, no CUDA device ({e})");
            None
        }
    }
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Rounds through `dtype` (the values a bf16 computation starts from), as f32 on the CPU.
fn rounded(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

/// max |a − b| / max |b|, with `a` brought to the CPU in f32.
fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(a.dims(), b.dims());
    let s = |t: Tensor| t.to_scalar::<f32>().unwrap();
    s((&a - &b).unwrap().abs().unwrap().max_all().unwrap())
        / s(b.abs().unwrap().max_all().unwrap()).max(1e-6)
}

/// Held by the tests that read the process-wide counters of planned and replayed passes, so
/// that tests running in parallel do not move them.
static COUNTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        1e-2
    } else {
        1e-4
    }
}

fn vb(tensors: &HashMap<String, Tensor>, device: &Device) -> VarBuilder<'static> {
    let on: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.to_device(device).unwrap()))
        .collect();
    VarBuilder::from_tensors(on, DType::F32, device)
}

#[test]
fn convolution_matches_cpu_forward_and_gradients() {
    let Some(gpu) = cuda("convolution") else {
        return;
    };
    // (n, c, h, w, cout, k, stride, pad, groups); the grouped ones are ResNeXt's 3×3.
    let shapes = [
        (4, 3, 32, 32, 16, 3, 1, 1, 1),
        (8, 16, 16, 16, 32, 3, 2, 1, 1),
        (8, 16, 16, 16, 32, 1, 2, 0, 1),
        (2, 64, 8, 8, 64, 3, 1, 1, 1),
        (3, 5, 7, 9, 6, 3, 1, 1, 1),
        (2, 8, 9, 9, 8, 1, 1, 0, 1),
        (4, 64, 16, 16, 64, 3, 1, 1, 4),
        (4, 32, 16, 16, 32, 3, 2, 1, 8),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (i, &(n, c, h, w, cout, k, stride, pad, groups)) in shapes.iter().enumerate() {
            let seed = 10 * i as u64;
            let x = rounded(&random(&[n, c, h, w], seed), dtype);
            let wt = rounded(&random(&[cout, c / groups, k, k], seed + 1), dtype);
            let dy = rounded(
                &random(
                    &[
                        n,
                        cout,
                        (h + 2 * pad - k) / stride + 1,
                        (w + 2 * pad - k) / stride + 1,
                    ],
                    seed + 2,
                ),
                dtype,
            );
            let run = |device: &Device, dtype: DType| {
                let weights = HashMap::from([("weight".to_string(), wt.clone())]);
                let conv =
                    Conv2d::grouped(c, cout, k, stride, pad, groups, vb(&weights, device)).unwrap();
                let xv = Var::from_tensor(&x.to_device(device).unwrap().to_dtype(dtype).unwrap())
                    .unwrap();
                let y = candle_core::Module::forward(&conv, xv.as_tensor()).unwrap();
                // Σ y·dy: its gradient with respect to y is dy.
                let dyd = dy.to_device(device).unwrap().to_dtype(dtype).unwrap();
                let l = (y.to_dtype(DType::F32).unwrap() * dyd.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let g = l.backward().unwrap();
                let dx = g.get(xv.as_tensor()).unwrap().clone();
                (y, dx)
            };
            let (yc, dxc) = run(&Device::Cpu, DType::F32);
            let (yg, dxg) = run(&gpu, dtype);
            let tol = tolerance(dtype);
            let what = format!("{dtype:?} conv {:?}", shapes[i]);
            assert!(
                max_rel(&yg, &yc) < tol,
                "{what}: forward off by {}",
                max_rel(&yg, &yc)
            );
            assert!(
                max_rel(&dxg, &dxc) < tol,
                "{what}: input gradient off by {}",
                max_rel(&dxg, &dxc)
            );
            assert_eq!(yg.dtype(), dtype, "{what}: output type");
        }
    }
}

#[test]
fn convolution_of_a_misaligned_batch_matches_cpu() {
    // A batch narrowed out of a larger one: with 3 × 7 × 9 = 189 values per image, the second
    // image of a bf16 tensor starts 378 bytes in, not 16-byte aligned as cuDNN's tensor-core
    // kernels want (the convolution copies such an operand).
    let Some(gpu) = cuda("misaligned convolution") else {
        return;
    };
    for dtype in [DType::F32, DType::BF16] {
        let x = rounded(&random(&[5, 3, 7, 9], 91), dtype);
        let wt = rounded(&random(&[8, 3, 3, 3], 92), dtype);
        let dy = rounded(&random(&[3, 8, 7, 9], 93), dtype);
        let run = |device: &Device, dtype: DType| {
            let mut varmap = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
            let conv = Conv2d::new(3, 8, 3, 1, 1, vb).unwrap();
            varmap
                .set_one("weight", wt.to_device(device).unwrap())
                .unwrap();
            let xv =
                Var::from_tensor(&x.to_device(device).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let part = xv.as_tensor().narrow(0, 1, 3).unwrap();
            let y = candle_core::Module::forward(&conv, &part).unwrap();
            let dyd = dy.to_device(device).unwrap().to_dtype(dtype).unwrap();
            let l = (y.to_dtype(DType::F32).unwrap() * dyd.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = l.backward().unwrap();
            let dx = g.get(xv.as_tensor()).unwrap().clone();
            let w = varmap.data().lock().unwrap()["weight"].clone();
            let dw = g.get(w.as_tensor()).unwrap().clone();
            (y, dx, dw)
        };
        let (yc, dxc, dwc) = run(&Device::Cpu, DType::F32);
        let (yg, dxg, dwg) = run(&gpu, dtype);
        let tol = tolerance(dtype);
        for (what, g, c) in [
            ("forward", &yg, &yc),
            ("input gradient", &dxg, &dxc),
            ("weight gradient", &dwg, &dwc),
        ] {
            let err = max_rel(g, c);
            assert!(err < tol, "{dtype:?} misaligned batch: {what} off by {err}");
        }
    }
}

#[test]
fn convolution_weight_gradient_matches_cpu() {
    let Some(gpu) = cuda("convolution weight gradient") else {
        return;
    };
    for dtype in [DType::F32, DType::BF16] {
        for &(n, c, h, cout, k, stride, pad) in &[
            (8, 16, 16, 32, 3, 1, 1),
            (4, 8, 15, 16, 3, 2, 1),
            (4, 32, 8, 64, 1, 2, 0),
        ] {
            let x = rounded(&random(&[n, c, h, h], 3), dtype);
            let wt = rounded(&random(&[cout, c, k, k], 4), dtype);
            let run = |device: &Device, dtype: DType| {
                let mut varmap = candle_nn::VarMap::new();
                let conv = Conv2d::new(
                    c,
                    cout,
                    k,
                    stride,
                    pad,
                    VarBuilder::from_varmap(&varmap, DType::F32, device),
                )
                .unwrap();
                varmap
                    .set_one("weight", wt.to_device(device).unwrap())
                    .unwrap();
                let _ = &mut varmap;
                let y = candle_core::Module::forward(
                    &conv,
                    &x.to_device(device).unwrap().to_dtype(dtype).unwrap(),
                )
                .unwrap();
                let l = y
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let g = l.backward().unwrap();
                let w = varmap.data().lock().unwrap()["weight"].clone();
                g.get(w.as_tensor()).unwrap().clone()
            };
            let (dwc, dwg) = (run(&Device::Cpu, DType::F32), run(&gpu, dtype));
            // bf16 rounds y before it is squared: a looser bound for the product of two errors.
            let tol = if dtype == DType::BF16 { 2e-2 } else { 1e-4 };
            assert_eq!(
                dwg.dtype(),
                DType::F32,
                "the master weights' gradient is f32"
            );
            assert!(
                max_rel(&dwg, &dwc) < tol,
                "{dtype:?} weight gradient off by {}",
                max_rel(&dwg, &dwc)
            );
        }
    }
}

#[test]
fn batch_norm_matches_cpu_in_training_and_inference() {
    let Some(gpu) = cuda("batch norm") else {
        return;
    };
    for dtype in [DType::F32, DType::BF16] {
        for relu in [false, true] {
            for &(n, c, h) in &[(16, 16, 8), (64, 32, 4), (3, 5, 7), (256, 8, 2)] {
                // A large mean next to the spread, as after a convolution without bias.
                let x = rounded(
                    &(random(&[n, c, h, h], 5) * 3.0)
                        .unwrap()
                        .affine(1.0, 2.0)
                        .unwrap(),
                    dtype,
                );
                let dy = rounded(&random(&[n, c, h, h], 6), dtype);
                let params = HashMap::from([
                    ("weight".to_string(), random(&[c], 7)),
                    ("bias".to_string(), random(&[c], 8)),
                ]);
                let run = |device: &Device, dtype: DType| {
                    let mut varmap = candle_nn::VarMap::new();
                    let bn =
                        BatchNorm::new(c, VarBuilder::from_varmap(&varmap, DType::F32, device))
                            .unwrap();
                    for (k, v) in &params {
                        varmap.set_one(k, v.to_device(device).unwrap()).unwrap();
                    }
                    let _ = &mut varmap;
                    let xv =
                        Var::from_tensor(&x.to_device(device).unwrap().to_dtype(dtype).unwrap())
                            .unwrap();
                    let y = if relu {
                        bn.forward_relu_t(xv.as_tensor(), true)
                    } else {
                        bn.forward_t(xv.as_tensor(), true)
                    }
                    .unwrap();
                    let dyd = dy.to_device(device).unwrap();
                    let l = (y.to_dtype(DType::F32).unwrap() * dyd)
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    let g = l.backward().unwrap();
                    let vars = varmap.data().lock().unwrap();
                    let grad = |name: &str| g.get(vars[name].as_tensor()).unwrap().clone();
                    // The running statistics after one training batch, then inference with them.
                    let stats = [
                        vars["running_mean"].as_tensor().copy().unwrap(),
                        vars["running_var"].as_tensor().copy().unwrap(),
                    ];
                    let eval = bn
                        .forward_t(
                            &x.to_device(device).unwrap().to_dtype(dtype).unwrap(),
                            false,
                        )
                        .unwrap();
                    (
                        y,
                        g.get(xv.as_tensor()).unwrap().clone(),
                        grad("weight"),
                        grad("bias"),
                        eval,
                        stats,
                    )
                };
                let c_ = run(&Device::Cpu, DType::F32);
                let g_ = run(&gpu, dtype);
                let tol = tolerance(dtype);
                let what = format!("{dtype:?} batch norm (relu {relu}) {:?}", (n, c, h));
                for (name, a, b) in [
                    ("output", &g_.0, &c_.0),
                    ("input gradient", &g_.1, &c_.1),
                    ("weight gradient", &g_.2, &c_.2),
                    ("bias gradient", &g_.3, &c_.3),
                    ("inference output", &g_.4, &c_.4),
                    ("running mean", &g_.5[0], &c_.5[0]),
                    ("running variance", &g_.5[1], &c_.5[1]),
                ] {
                    let e = max_rel(a, b);
                    assert!(e < tol, "{what}: {name} off by {e}");
                }
                assert_eq!(g_.0.dtype(), dtype);
                assert_eq!(g_.2.dtype(), DType::F32, "parameter gradients stay f32");
            }
        }
    }
}

#[test]
fn residual_add_relu_matches_cpu() {
    let Some(gpu) = cuda("add-relu") else {
        return;
    };
    for dtype in [DType::F32, DType::BF16] {
        let a = rounded(&random(&[8, 16, 8, 8], 11), dtype);
        let b = rounded(&random(&[8, 16, 8, 8], 12), dtype);
        let dy = rounded(&random(&[8, 16, 8, 8], 13), dtype);
        let run = |device: &Device, dtype: DType| {
            let av =
                Var::from_tensor(&a.to_device(device).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let bv =
                Var::from_tensor(&b.to_device(device).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let y = add_relu(av.as_tensor(), bv.as_tensor()).unwrap();
            let l = (y.to_dtype(DType::F32).unwrap() * dy.to_device(device).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = l.backward().unwrap();
            (
                y,
                g.get(av.as_tensor()).unwrap().clone(),
                g.get(bv.as_tensor()).unwrap().clone(),
            )
        };
        let (c, g) = (run(&Device::Cpu, DType::F32), run(&gpu, dtype));
        let tol = tolerance(dtype);
        assert!(max_rel(&g.0, &c.0) < tol, "{dtype:?} add-relu output");
        assert!(max_rel(&g.1, &c.1) < tol, "{dtype:?} add-relu gradient a");
        assert!(max_rel(&g.2, &c.2) < tol, "{dtype:?} add-relu gradient b");
    }
}

/// The stem's max-pooling (3×3, stride 2, padding 1; the kernel `LDL_GPU_PLAN=1` opts the
/// layers into) on odd and even sizes: in f32 the values
/// and the input gradient equal the CPU's bitwise (both add a gradient output by output); in
/// bf16 the values are the CPU's on the rounded inputs.
#[test]
fn max_pool_matches_cpu() {
    use engine::models::pool::{fused_max_pool2d, PoolGeometry};
    let Some(gpu) = cuda("max-pool") else {
        return;
    };
    for (dims, dtype) in [
        ([4, 8, 9, 9], DType::F32),
        ([2, 16, 16, 14], DType::F32),
        ([4, 8, 9, 9], DType::BF16),
    ] {
        let x = rounded(&random(&dims, 21), dtype);
        let run = |device: &Device, dtype: DType| {
            let xv =
                Var::from_tensor(&x.to_device(device).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let y = fused_max_pool2d(xv.as_tensor(), PoolGeometry::STEM).unwrap();
            let dy = random(y.dims(), 22).to_device(device).unwrap();
            let l = (y.to_dtype(DType::F32).unwrap() * dy)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = l.backward().unwrap();
            (y, g.get(xv.as_tensor()).unwrap().clone())
        };
        let (c, g) = (run(&Device::Cpu, DType::F32), run(&gpu, dtype));
        let tol = if dtype == DType::F32 {
            0.0
        } else {
            tolerance(dtype)
        };
        assert!(
            max_rel(&g.0, &c.0) <= tol,
            "{dtype:?} {dims:?} max-pool output"
        );
        assert!(
            max_rel(&g.1, &c.1) <= tol,
            "{dtype:?} {dims:?} max-pool gradient"
        );
    }
}

#[test]
fn sgd_step_matches_cpu() {
    use engine::optim::{Sgd, SgdConfig};
    let Some(gpu) = cuda("sgd") else {
        return;
    };
    for (momentum, nesterov) in [(0.9, false), (0.9, true), (0.0, false)] {
        let w0 = random(&[64, 3, 3, 3], 20);
        let run = |device: &Device| {
            let w = Var::from_tensor(&w0.to_device(device).unwrap()).unwrap();
            let mut opt = Sgd::new(
                vec![("w".into(), w.clone())],
                SgdConfig {
                    momentum,
                    weight_decay: 5e-4,
                    nesterov,
                },
            );
            for s in 0..4 {
                let target = random(&[64, 3, 3, 3], 30 + s).to_device(device).unwrap();
                let l = (w.as_tensor() - target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                opt.step(&l.backward().unwrap(), 0.05).unwrap();
            }
            let state = opt.state().unwrap();
            (w.as_tensor().clone(), state.get("w").cloned())
        };
        let (c, g) = (run(&Device::Cpu), run(&gpu));
        assert!(
            max_rel(&g.0, &c.0) < 1e-5,
            "weights after 4 steps (momentum {momentum}, nesterov {nesterov})"
        );
        match (g.1, c.1) {
            (Some(a), Some(b)) => assert!(max_rel(&a, &b) < 1e-5, "momentum buffers"),
            (None, None) => {}
            _ => panic!("momentum buffer present on one device only"),
        }
    }
}

#[test]
fn resnet_training_steps_follow_the_cpu() {
    use engine::losses::cross_entropy;
    use engine::models::{Model, ModelSpec};
    use engine::optim::{Sgd, SgdConfig};
    let Some(gpu) = cuda("resnet training") else {
        return;
    };
    let spec = ModelSpec::new("resnet8", 10, 3).unwrap();
    let x = random(&[32, 3, 32, 32], 40);
    let y = Tensor::from_vec(
        (0..32u32).map(|i| i % 10).collect::<Vec<_>>(),
        32,
        &Device::Cpu,
    )
    .unwrap();
    let run = |device: &Device, dtype: DType| -> Vec<f32> {
        let model = Model::new(&spec, device, 7).unwrap();
        let mut opt = Sgd::new(model.trainable(), SgdConfig::default());
        let (x, y) = (
            x.to_device(device).unwrap().to_dtype(dtype).unwrap(),
            y.to_device(device).unwrap(),
        );
        (0..8)
            .map(|_| {
                let loss = cross_entropy(&model.net.forward_t(&x, true).unwrap(), &y).unwrap();
                opt.step(&loss.backward().unwrap(), 0.05).unwrap();
                loss.to_scalar::<f32>().unwrap()
            })
            .collect()
    };
    let cpu = run(&Device::Cpu, DType::F32);
    let f32_gpu = run(&gpu, DType::F32);
    let bf16_gpu = run(&gpu, DType::BF16);
    eprintln!(
        "loss per step\n  cpu  f32  {cpu:?}\n  cuda f32  {f32_gpu:?}\n  cuda bf16 {bf16_gpu:?}"
    );
    for (s, (a, b)) in f32_gpu.iter().zip(&cpu).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
            "f32 step {s}: {a} on CUDA, {b} on the CPU"
        );
    }
    for (s, (a, b)) in bf16_gpu.iter().zip(&cpu).enumerate() {
        assert!(
            (a - b).abs() <= 5e-2 * b.abs().max(1.0),
            "bf16 step {s}: {a} on CUDA, {b} on the CPU"
        );
    }
    assert!(
        cpu[7] < cpu[0] && bf16_gpu[7] < bf16_gpu[0],
        "the loss falls over 8 steps"
    );
}

/// The planned step on CUDA (`models::plan` over `gpu::plan`) against the planned step on the
/// CPU (itself bitwise the autograd path): every parameter's gradient of one step, with two
/// forward passes (half-batches) into one loss and a third pass that never reaches it; then
/// three SGD steps' losses and the weights and running statistics after them. Option A and B
/// shortcuts, bottlenecks, a grouped convolution and the ImageNet stem's max-pooling; f32 (1e-3)
/// and bf16 (5e-2); NCHW and channels-last (NHWC activations, KRSC weight copies).
#[test]
fn planned_steps_follow_the_cpu() {
    use engine::losses::cross_entropy;
    use engine::models::plan::PlanOptions;
    use engine::models::{Mode, Model, ModelSpec, Shortcut};
    use engine::optim::{Sgd, SgdConfig};
    let Some(gpu) = cuda("planned steps") else {
        return;
    };
    let _counters = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let cases = [
        ("resnet8", 16, Shortcut::A, 16),
        ("resnet14", 8, Shortcut::B, 16),
        // Width 8: narrower, nearly constant BatchNorm channels amplify rounding (net.rs).
        ("resnet50", 8, Shortcut::B, 32),
        ("resnext29_2x4d", 4, Shortcut::B, 16),
        // The ImageNet stem: 7×7 stride-2 convolution and the max-pooling.
        ("resnet18_imagenet", 8, Shortcut::B, 36),
    ];
    for (arch, width, shortcut, hw) in cases {
        let spec = ModelSpec {
            width,
            shortcut,
            ..ModelSpec::new(arch, 10, 3).unwrap()
        };
        let x = random(&[12, 3, hw, hw], 50);
        let y = Tensor::from_vec((0..12u32).map(|i| i % 10).collect(), 12, &Device::Cpu).unwrap();
        // (gradients of step 0 by name, losses, values after the steps by name)
        type Run = (Vec<(String, Tensor)>, Vec<f32>, Vec<(String, Tensor)>);
        let run = |device: &Device, dtype: DType, nhwc: bool, x: &Tensor| -> Run {
            let mut m = Model::new(&spec, device, 7).unwrap();
            let options = PlanOptions {
                graphs: false,
                channels_last: nhwc,
            };
            assert!(
                m.net.plan_training_with(Some(dtype), options),
                "{arch}: planned on {device:?}"
            );
            let mut opt = Sgd::new(m.trainable(), SgdConfig::default());
            let (x, y) = (
                x.to_device(device).unwrap().to_dtype(dtype).unwrap(),
                y.to_device(device).unwrap(),
            );
            let (mut first, mut losses) = (Vec::new(), Vec::new());
            for step in 0..3u64 {
                let mode = Mode::train(step);
                let a = m
                    .net
                    .forward_mode(&x.narrow(0, 0, 8).unwrap(), mode)
                    .unwrap();
                let b = m
                    .net
                    .forward_mode(&x.narrow(0, 8, 4).unwrap(), mode)
                    .unwrap();
                let _unused = m.net.forward_mode(&x, mode).unwrap();
                let logits = Tensor::cat(&[&a, &b], 0).unwrap();
                let loss = cross_entropy(&logits, &y).unwrap();
                let grads = m.net.backward(&loss).unwrap();
                if step == 0 {
                    first = m
                        .trainable()
                        .into_iter()
                        .map(|(name, v)| {
                            let g = grads
                                .get(v.as_tensor())
                                .expect("every parameter has a gradient");
                            (name, g.to_device(&Device::Cpu).unwrap())
                        })
                        .collect();
                }
                opt.step(&grads, 0.05).unwrap();
                losses.push(loss.to_scalar::<f32>().unwrap());
            }
            let data = m.vars.data().lock().unwrap();
            let mut after: Vec<(String, Tensor)> = data
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().to_device(&Device::Cpu).unwrap()))
                .collect();
            after.sort_by(|a, b| a.0.cmp(&b.0));
            first.sort_by(|a, b| a.0.cmp(&b.0));
            (first, losses, after)
        };
        for (dtype, tol) in [(DType::F32, 1e-3f32), (DType::BF16, 5e-2)] {
            // bf16 against the CPU on the same bf16-rounded images.
            let cpu = run(&Device::Cpu, DType::F32, false, &rounded(&x, dtype));
            for nhwc in [false, true] {
                let case = format!("{arch} {dtype:?}{}", if nhwc { " NHWC" } else { "" });
                let before = engine::models::net::planned_forwards();
                let gpu_run = run(&gpu, dtype, nhwc, &x);
                assert_eq!(
                    engine::models::net::planned_forwards() - before,
                    9,
                    "{case}: every forward pass on CUDA took the plan"
                );
                let mut worst = (0f32, String::new());
                for ((name, g), (_, c)) in gpu_run.0.iter().zip(&cpu.0) {
                    let e = max_rel(g, c);
                    if e > worst.0 {
                        worst = (e, name.clone());
                    }
                    assert!(e <= tol, "{case}: gradient of `{name}` off by {e}");
                }
                eprintln!("{case}: largest gradient error {} (`{}`)", worst.0, worst.1);
                for (s, (a, b)) in gpu_run.1.iter().zip(&cpu.1).enumerate() {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(1.0),
                        "{case} step {s}: loss {a} on CUDA, {b} on the CPU"
                    );
                }
                for ((name, v), (_, c)) in gpu_run.2.iter().zip(&cpu.2) {
                    let e = max_rel(v, c);
                    assert!(e <= tol, "{case}: `{name}` after 3 steps off by {e}");
                }
                eprintln!("{case}: losses {:?} (CPU {:?})", gpu_run.1, cpu.1);
                eprintln!(
                    "{case}: {} channels-last geometries so far cuDNN could not plan (run \
                     transposed)",
                    engine::models::net::transposed_convolutions()
                );
            }
        }
    }
}

/// The multi-tensor update (64 parameters per launch) over 70 parameters of different lengths,
/// one of them longer than a launch's grid covers in one stride, with a learning rate that
/// changes every step (it is read from device memory): weights and momentum buffers as on
/// the CPU.
#[test]
fn sgd_over_many_parameters_matches_cpu() {
    use engine::optim::{Sgd, SgdConfig};
    let Some(gpu) = cuda("sgd over many parameters") else {
        return;
    };
    let sizes: Vec<usize> = (0..70)
        .map(|i| {
            if i == 5 {
                20_000_000
            } else {
                1 + (i * 37) % 500
            }
        })
        .collect();
    let run = |device: &Device| {
        let vars: Vec<(String, Var)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let w = random(&[n], 100 + i as u64).to_device(device).unwrap();
                (format!("p{i:02}"), Var::from_tensor(&w).unwrap())
            })
            .collect();
        let mut opt = Sgd::new(vars.clone(), SgdConfig::default());
        for (s, lr) in [0.1, 0.05, 0.01].into_iter().enumerate() {
            let mut loss = Tensor::zeros((), DType::F32, device).unwrap();
            for (i, (_, v)) in vars.iter().enumerate() {
                let target = random(v.dims(), 1000 + (s * 100 + i) as u64)
                    .to_device(device)
                    .unwrap();
                let l = (v.as_tensor() - target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                loss = (loss + l).unwrap();
            }
            opt.step(&loss.backward().unwrap(), lr).unwrap();
        }
        let state = opt.state().unwrap();
        vars.into_iter()
            .map(|(name, v)| {
                let b = state[&name].clone();
                (name, v.as_tensor().clone(), b)
            })
            .collect::<Vec<_>>()
    };
    let (c, g) = (run(&Device::Cpu), run(&gpu));
    for ((name, wg, bg), (_, wc, bc)) in g.iter().zip(&c) {
        assert!(max_rel(wg, wc) < 1e-5, "`{name}`: weights after 3 steps");
        assert!(
            max_rel(bg, bc) < 1e-5,
            "`{name}`: momentum buffer after 3 steps"
        );
    }
}

/// The planned step with its passes recorded as CUDA graphs and replayed (`LDL_GPU_GRAPH`)
/// against the same step run launch by launch: the same kernels on the same buffers, so the
/// logits of every step and the weights, momentum buffers and running statistics after them
/// are bitwise equal. Eight steps of two forward passes into one loss plus one whose output is
/// unused, a learning rate that changes every step, and a smaller batch at steps 4 and 6 (the
/// partial last batch of an epoch: unrecorded the first time, recorded when it recurs). NCHW
/// and channels-last.
#[test]
fn recorded_steps_equal_unrecorded_bitwise() {
    use engine::losses::cross_entropy;
    use engine::models::plan::PlanOptions;
    use engine::models::{Mode, Model, ModelSpec, Shortcut};
    use engine::optim::{Sgd, SgdConfig};
    let Some(gpu) = cuda("recorded steps") else {
        return;
    };
    let _counters = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let cases = [
        ("resnet8", Shortcut::A),
        ("resnet14", Shortcut::B),
        // The ImageNet stem: its max-pooling in the recorded passes (16 → 8 → 4).
        ("resnet18_imagenet", Shortcut::B),
    ]
    .into_iter()
    .flat_map(|a| [DType::F32, DType::BF16].map(|d| (a, d)))
    .flat_map(|c| [false, true].map(|nhwc| (c, nhwc)));
    for (((arch, shortcut), dtype), nhwc) in cases {
        let spec = ModelSpec {
            width: 8,
            shortcut,
            ..ModelSpec::new(arch, 10, 3).unwrap()
        };
        let run = |graphs: bool| {
            let mut m = Model::new(&spec, &gpu, 5).unwrap();
            let options = PlanOptions {
                graphs,
                channels_last: nhwc,
            };
            assert!(m.net.plan_training_with(Some(dtype), options));
            let mut opt = Sgd::new(m.trainable(), SgdConfig::default());
            let mut logits = Vec::new();
            for step in 0..8u64 {
                let n = if step == 4 || step == 6 { 10 } else { 16 };
                let x = random(&[n, 3, 16, 16], 60 + step)
                    .to_device(&gpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let y = Tensor::from_vec((0..n as u32).map(|i| i % 10).collect(), n, &gpu).unwrap();
                let mode = Mode::train(step);
                let a = m
                    .net
                    .forward_mode(&x.narrow(0, 0, 6).unwrap(), mode)
                    .unwrap();
                let b = m
                    .net
                    .forward_mode(&x.narrow(0, 6, n - 6).unwrap(), mode)
                    .unwrap();
                let _unused = m.net.forward_mode(&x, mode).unwrap();
                let l = Tensor::cat(&[&a, &b], 0).unwrap();
                let loss = cross_entropy(&l, &y).unwrap();
                opt.step(&m.net.backward(&loss).unwrap(), 0.1 / (1 + step) as f64)
                    .unwrap();
                logits.push(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            let data = m.vars.data().lock().unwrap();
            let mut after: Vec<(String, Vec<f32>)> = data
                .iter()
                .map(|(k, v)| {
                    let v = v.as_tensor().flatten_all().unwrap();
                    (k.clone(), v.to_vec1::<f32>().unwrap())
                })
                .collect();
            after.sort_by(|a, b| a.0.cmp(&b.0));
            let mut state: Vec<(String, Vec<f32>)> = opt
                .state()
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect();
            state.sort_by(|a, b| a.0.cmp(&b.0));
            (logits, after, state)
        };
        let plain = run(false);
        let before = engine::models::net::graph_replays();
        let refused = engine::models::net::unrecorded_passes();
        let recorded = run(true);
        let refused = engine::models::net::unrecorded_passes() - refused;
        // A failed recording falls back to the (bitwise equal) unrecorded pass: only this
        // count shows it.
        assert_eq!(
            refused, 0,
            "{arch} {dtype:?} nhwc={nhwc}: passes not recorded"
        );
        // Per step 3 forward passes (one unused) and 2 backward. Step 0 sizes every buffer
        // (a pass warmed before a later one allocated is not recorded in step 1), so each of
        // the 5 is recorded by step 2 at the latest and replays in steps 2 and 3: at least 10.
        // Steps 1 and 4-7 add more, fewer if a new batch size grows cuDNN's workspace (which
        // retires every graph).
        let replays = engine::models::net::graph_replays() - before;
        let case = format!("{arch} {dtype:?} nhwc={nhwc}");
        eprintln!("{case}: {replays} recorded passes replayed");
        assert!(replays >= 10, "{case}: only {replays} passes replayed");
        for (s, (a, b)) in recorded.0.iter().zip(&plain.0).enumerate() {
            assert_eq!(a, b, "{case} step {s}: logits");
        }
        for ((name, a), (_, b)) in recorded.1.iter().zip(&plain.1) {
            assert_eq!(a, b, "{case}: `{name}` after 8 steps");
        }
        for ((name, a), (_, b)) in recorded.2.iter().zip(&plain.2) {
            assert_eq!(a, b, "{case}: momentum of `{name}` after 8 steps");
        }
    }
}

/// Planned evaluation-mode passes on CUDA (a teacher's): against the layers on the CPU after
/// two training steps there (f32 1e-4, bf16 2e-2 on bf16-rounded images), every pass through
/// the plan; recorded as graphs and replayed, bitwise the unrecorded passes, over batches of
/// 16, 10 and 16 images repeated; NCHW and channels-last; a CIFAR ResNet and the ImageNet stem.
#[test]
fn planned_inference_follows_the_cpu() {
    let Some(gpu) = cuda("planned inference") else {
        return;
    };
    let _counters = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    // A CIFAR ResNet, and the ImageNet stem with its max-pooling (16 → 8 → 4).
    for arch in ["resnet14", "resnet18_imagenet"] {
        inference_follows_the_cpu(&gpu, arch);
    }
}

/// [`planned_inference_follows_the_cpu`] for one architecture.
fn inference_follows_the_cpu(gpu: &Device, arch: &str) {
    use engine::losses::cross_entropy;
    use engine::models::plan::PlanOptions;
    use engine::models::{Model, ModelSpec, Shortcut};
    use engine::optim::{Sgd, SgdConfig};
    let spec = ModelSpec {
        width: 8,
        shortcut: Shortcut::B,
        ..ModelSpec::new(arch, 10, 3).unwrap()
    };
    // Two CPU training steps move the weights and running statistics off their initial values;
    // the GPU model loads the same tensors.
    let cpu_model = Model::new(&spec, &Device::Cpu, 4).unwrap();
    let mut opt = Sgd::new(cpu_model.trainable(), SgdConfig::default());
    let y = Tensor::from_vec((0..16u32).map(|i| i % 10).collect(), 16, &Device::Cpu).unwrap();
    for s in 0..2 {
        let x = random(&[16, 3, 16, 16], 80 + s);
        let loss = cross_entropy(&cpu_model.net.forward_t(&x, true).unwrap(), &y).unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
    }
    let tensors: HashMap<String, Tensor> = cpu_model
        .vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let batches: Vec<Tensor> = [16, 10, 16, 10, 16]
        .iter()
        .enumerate()
        .map(|(i, &n)| random(&[n, 3, 16, 16], 90 + i as u64))
        .collect();
    let cases = [DType::F32, DType::BF16]
        .into_iter()
        .flat_map(|d| [false, true].map(|nhwc| (d, nhwc)));
    for (dtype, nhwc) in cases {
        let tol = if dtype == DType::BF16 { 2e-2 } else { 1e-4 };
        let run = |graphs: bool| -> Vec<Vec<f32>> {
            let mut m = Model::new(&spec, gpu, 4).unwrap();
            for (k, v) in m.vars.data().lock().unwrap().iter() {
                v.set(&tensors[k].to_device(gpu).unwrap()).unwrap();
            }
            let options = PlanOptions {
                graphs,
                channels_last: nhwc,
            };
            assert!(m.net.plan_inference_with(true, options));
            let before = engine::models::net::planned_forwards();
            let out = batches
                .iter()
                .map(|x| {
                    let x = x.to_device(gpu).unwrap().to_dtype(dtype).unwrap();
                    let l = m.net.forward_t(&x, false).unwrap();
                    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect();
            let planned = engine::models::net::planned_forwards() - before;
            assert_eq!(
                planned,
                batches.len() as u64,
                "{arch} {dtype:?} nhwc={nhwc}: every pass planned"
            );
            out
        };
        let plain = run(false);
        let replays = engine::models::net::graph_replays();
        let refused = engine::models::net::unrecorded_passes();
        let recorded = run(true);
        let replays = engine::models::net::graph_replays() - replays;
        let refused = engine::models::net::unrecorded_passes() - refused;
        assert_eq!(
            refused, 0,
            "inference {arch} {dtype:?} nhwc={nhwc}: passes not recorded"
        );
        eprintln!("inference {arch} {dtype:?} nhwc={nhwc}: {replays} recorded passes replayed");
        // The batch sizes repeat, so a pass of a shape already recorded must replay its graph.
        assert!(
            replays >= 1,
            "{arch} {dtype:?} nhwc={nhwc}: no recorded pass was replayed"
        );
        assert_eq!(
            recorded, plain,
            "{arch} {dtype:?} nhwc={nhwc}: recorded passes equal unrecorded ones"
        );
        for (i, x) in batches.iter().enumerate() {
            let reference = cpu_model.net.forward_t(&rounded(x, dtype), false).unwrap();
            let got = Tensor::from_vec(plain[i].clone(), reference.dims(), &Device::Cpu).unwrap();
            let e = max_rel(&got, &reference);
            assert!(
                e <= tol,
                "{arch} {dtype:?} nhwc={nhwc} batch {i}: logits off by {e}"
            );
        }
    }
}

/// CRD's scores on CUDA (`matmul_const_lhs`: the product, and the gradient of the anchors
/// alone) and an evaluation-mode pass through layers (DenseNet, no plan: parameters read
/// detached) follow the CPU in f32, and the pass records no graph.
#[test]
fn constant_products_and_layer_evaluation_follow_the_cpu() {
    use engine::const_matmul::matmul_const_lhs;
    use engine::models::{Model, ModelSpec};
    let Some(gpu) = cuda("constant products and layer evaluation") else {
        return;
    };
    let w = random(&[4, 33, 16], 100);
    let v = random(&[4, 16, 1], 101);
    let weights = random(&[4, 33, 1], 102);
    let on = |dev: &Device| {
        let v = Var::from_tensor(&v.to_device(dev).unwrap()).unwrap();
        let w = w.to_device(dev).unwrap();
        let y = matmul_const_lhs(&w, v.as_tensor()).unwrap();
        let loss = (&y * &weights.to_device(dev).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(&w).is_none(),
            "a gradient was made for the constant"
        );
        (y, grads.get(v.as_tensor()).unwrap().clone())
    };
    let ((y_gpu, g_gpu), (y_cpu, g_cpu)) = (on(&gpu), on(&Device::Cpu));
    assert!(max_rel(&y_gpu, &y_cpu) < 1e-5, "scores");
    assert!(max_rel(&g_gpu, &g_cpu) < 1e-5, "anchor gradient");

    let spec = ModelSpec {
        width: 8,
        ..ModelSpec::new("densenet_cifar", 10, 3).unwrap()
    };
    let cpu_model = Model::new(&spec, &Device::Cpu, 5).unwrap();
    let gpu_model = Model::new(&spec, &gpu, 5).unwrap();
    let x = random(&[6, 3, 16, 16], 103);
    let reference = cpu_model.net.forward_t(&x, false).unwrap();
    let got = gpu_model
        .net
        .forward_t(&x.to_device(&gpu).unwrap(), false)
        .unwrap();
    assert!(!got.track_op(), "an evaluation pass recorded a graph");
    let e = max_rel(&got, &reference);
    assert!(e < 1e-4, "DenseNet evaluation logits off by {e}");
}
