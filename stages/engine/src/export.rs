//! Models out to PyTorch: a model's weights written as `torch.save(model.state_dict(), path)`
//! writes them (its zip format, which `torch.load` reads, `weights_only=True` included), or as
//! a safetensors file, under the names of the PyTorch definition the user loads them into.
//!
//! Our names are torchvision's (`downsample`, `fc`) for every ResNet, which RepDistiller's
//! CIFAR ResNets (`resnet8` … `resnet110`) share; kuangliu/pytorch-cifar's ResNets, and
//! RepDistiller's and akamaster's other ones, say `shortcut` and `linear` instead
//! ([`Naming::Kuangliu`]). ResNeXt, DenseNet and DLA have kuangliu's names already.
//!
//! The zip archive holds, as PyTorch's writer lays it out (torch/serialization.py `_save`,
//! caffe2/serialize/inline_container.cc): `<name>/data.pkl`, a pickle (protocol 2) of an
//! `OrderedDict` of `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
//! OrderedDict())` calls, each storage the persistent id `('storage', torch.FloatStorage,
//! '<i>', 'cpu', numel)` (`HalfStorage`, `BFloat16Storage` for weights written in f16 or bf16);
//! `<name>/data/<i>`, each storage's little-endian bytes; `<name>/version`
//! (3) and `<name>/byteorder` (little). Entries are stored uncompressed at 64-byte offsets, as
//! PyTorch's own reader maps them.

use crate::error::{EngineError, Result};
use crate::import::Naming;
use crate::models::Arch;
use candle_core::{DType, Tensor};
use std::io::Write;

/// `name` (ours) as the PyTorch definitions of `naming` call it, for a model of `arch`.
pub fn rename(arch: &Arch, naming: Naming, name: &str) -> String {
    match naming {
        Naming::Kuangliu if arch.is_resnet() => {
            let name = name.replace(".downsample.", ".shortcut.");
            match name.strip_prefix("fc.") {
                Some(rest) => format!("linear.{rest}"),
                None => name,
            }
        }
        _ => name.to_owned(),
    }
}

/// PyTorch's storage class of `dtype`: f32, f16 or bf16, the types a state dict is exported in.
fn storage_class(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("FloatStorage"),
        DType::F16 => Ok("HalfStorage"),
        DType::BF16 => Ok("BFloat16Storage"),
        d => Err(EngineError::Numeric(format!(
            "exporting {d:?} weights: f32, f16 or bf16 only"
        ))),
    }
}

/// The little-endian bytes of `t` as `dtype` (the narrower types rounded to nearest, ties to
/// even, as PyTorch's `.half()` and `.bfloat16()` round).
fn storage_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F16 => le_bytes(t.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        DType::BF16 => le_bytes(t.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        _ => le_bytes(t.to_vec1::<f32>()?, f32::to_le_bytes),
    })
}

fn le_bytes<T, const N: usize>(values: Vec<T>, bytes: fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(bytes).collect()
}

/// The bytes of a `torch.save` zip archive of the state dict `tensors` (name, tensor), in
/// their order, each as a tensor of `dtype` (f32, f16 or bf16); `archive` names the archive's
/// folder (PyTorch takes the file's stem).
pub fn pth_bytes(archive: &str, tensors: &[(String, Tensor)], dtype: DType) -> Result<Vec<u8>> {
    let numeric = |e: String| EngineError::Numeric(format!("writing a .pth: {e}"));
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64)
        .large_file(true);
    let entry = |zip: &mut zip::ZipWriter<_>, name: String, bytes: &[u8]| {
        zip.start_file(name, options)
            .map_err(|e| numeric(e.to_string()))?;
        zip.write_all(bytes).map_err(|e| numeric(e.to_string()))
    };
    let class = storage_class(dtype)?;
    entry(
        &mut zip,
        format!("{archive}/data.pkl"),
        &pickle(tensors, class)?,
    )?;
    entry(&mut zip, format!("{archive}/byteorder"), b"little")?;
    for (i, (_, t)) in tensors.iter().enumerate() {
        entry(
            &mut zip,
            format!("{archive}/data/{i}"),
            &storage_bytes(t, dtype)?,
        )?;
    }
    entry(&mut zip, format!("{archive}/version"), b"3\n")?;
    let cursor = zip.finish().map_err(|e| numeric(e.to_string()))?;
    Ok(cursor.into_inner())
}

/// The pickle of the state dict: `OrderedDict` with each tensor rebuilt from storage `i`, of
/// the storage class `class` (`FloatStorage`, ...).
fn pickle(tensors: &[(String, Tensor)], class: &str) -> Result<Vec<u8>> {
    let mut p = Pickler::default();
    p.out.extend_from_slice(b"\x80\x02");
    p.global("collections", "OrderedDict");
    p.out.extend_from_slice(b")R");
    p.memoise();
    if !tensors.is_empty() {
        p.out.push(b'(');
    }
    for (i, (name, t)) in tensors.iter().enumerate() {
        let dims = t.dims();
        // Row-major strides, as `contiguous()` gives.
        let mut strides = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        p.text(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.out.push(b'(');
        // The storage's persistent id.
        p.out.push(b'(');
        p.text("storage");
        p.global("torch", class);
        p.text(&i.to_string());
        p.text("cpu");
        p.int(t.elem_count());
        p.out.extend_from_slice(b"tQ");
        p.int(0);
        p.ints(dims);
        p.ints(&strides);
        p.out.push(0x89); // requires_grad False, as state_dict() gives
        p.global("collections", "OrderedDict");
        p.out.extend_from_slice(b")R"); // backward hooks: none
        p.out.extend_from_slice(b"tR");
    }
    if !tensors.is_empty() {
        p.out.push(b'u');
    }
    p.out.push(b'.');
    Ok(p.out)
}

/// A pickle writer for the few values a state dict needs; classes are memoised once, as
/// CPython's pickler does.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    memo: std::collections::HashMap<String, u32>,
    next: u32,
}

impl Pickler {
    /// `BINPUT`/`LONG_BINPUT` of the value on top, returning its memo index.
    fn memoise(&mut self) -> u32 {
        let i = self.next;
        self.next += 1;
        match u8::try_from(i) {
            Ok(b) => self.out.extend_from_slice(&[b'q', b]),
            Err(_) => {
                self.out.push(b'r');
                self.out.extend_from_slice(&i.to_le_bytes());
            }
        }
        i
    }

    /// The class `module.name`: `GLOBAL` the first time, `BINGET` after.
    fn global(&mut self, module: &str, name: &str) {
        let key = format!("{module}\n{name}");
        if let Some(&i) = self.memo.get(&key) {
            match u8::try_from(i) {
                Ok(b) => self.out.extend_from_slice(&[b'h', b]),
                Err(_) => {
                    self.out.push(b'j');
                    self.out.extend_from_slice(&i.to_le_bytes());
                }
            }
            return;
        }
        self.out.push(b'c');
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'\n');
        let i = self.memoise();
        self.memo.insert(key, i);
    }

    /// `BINUNICODE`.
    fn text(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A non-negative integer: `BININT1`, `BININT2`, `BININT` or `LONG1`.
    fn int(&mut self, v: usize) {
        if let Ok(b) = u8::try_from(v) {
            self.out.extend_from_slice(&[b'K', b]);
        } else if let Ok(w) = u16::try_from(v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&w.to_le_bytes());
        } else if let Ok(d) = i32::try_from(v) {
            self.out.push(b'J');
            self.out.extend_from_slice(&d.to_le_bytes());
        } else {
            // Little-endian two's complement: no zero byte above one without the top bit.
            let mut bytes = (v as u64).to_le_bytes().to_vec();
            bytes.push(0);
            while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] < 0x80 {
                bytes.pop();
            }
            self.out.extend_from_slice(&[0x8a, bytes.len() as u8]);
            self.out.extend_from_slice(&bytes);
        }
    }

    /// A tuple of non-negative integers.
    fn ints(&mut self, v: &[usize]) {
        match v.len() {
            0 => self.out.push(b')'),
            1..=3 => {
                v.iter().for_each(|&x| self.int(x));
                self.out.push(0x84 + v.len() as u8);
            }
            _ => {
                self.out.push(b'(');
                v.iter().for_each(|&x| self.int(x));
                self.out.push(b't');
            }
        }
    }
}

/// The bytes of a safetensors file of `tensors`, each as a tensor of `dtype` (f32, f16 or
/// bf16).
pub fn safetensors_bytes(tensors: &[(String, Tensor)], dtype: DType) -> Result<Vec<u8>> {
    storage_class(dtype)?;
    let cast = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(cast, None).map_err(|e| EngineError::Numeric(e.to_string()))
}
