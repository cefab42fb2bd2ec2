//! `pipeline inspect` of a model checkpoint (a `torch.save` file, a TorchScript archive, a
//! safetensors file): what it holds, read without building a tensor, which of our models it
//! is, checked by importing it as an `import` stage would, and the stage to write for it.

use super::Selection;
use anyhow::Result;
use engine::import::{Contents, Holder, Select, TensorInfo};
use std::io::Write as _;
use std::path::Path;

/// Shows what the checkpoint at `path` holds; `sel` picks the part the import would read and
/// the model to check it against.
pub fn checkpoint(path: &Path, sel: &Selection) -> Result<()> {
    let contents = engine::import::survey(path, sel.key.as_deref())?;
    let size = std::fs::metadata(path)?.len();
    outln!(
        "{} — {}, {size} bytes: {}",
        path.display(),
        format_name(&contents),
        contents.saved
    );
    if !contents.entries.is_empty() {
        outln!("  entries:");
        for (k, what) in &contents.entries {
            outln!("    {k:<24} {what}");
        }
    }
    outln!("  tensors held:");
    const SHOWN: usize = 20;
    if contents.holders.len() > SHOWN {
        outln!(
            "    ({} places, the {SHOWN} shallowest shown)",
            contents.holders.len()
        );
    }
    for h in contents.holders.iter().take(SHOWN) {
        let key = h.key.as_deref().unwrap_or("(top level)");
        let n = h.tensors.len();
        outln!(
            "    {key:<24} {n} tensor{}, {} values: {}",
            if n == 1 { "" } else { "s" },
            values(&h.tensors),
            h.what
        );
        outln!("    {:<24} names start {}", "", starts(&h.tensors));
    }
    let Some(holder) = chosen(&contents)? else {
        return Ok(());
    };
    let picked: Vec<(String, &TensorInfo)> = holder
        .tensors
        .iter()
        .filter_map(|t| {
            Some((
                t.name
                    .strip_prefix(sel.prefix.as_deref().unwrap_or(""))?
                    .to_owned(),
                t,
            ))
        })
        .collect();
    check_model(path, holder, &picked, sel)?;
    outln!("  its tensors ({}):", picked.len());
    for (name, t) in &picked {
        outln!("    {name:<48} {:<9} {:?}", t.dtype, t.dims);
    }
    Ok(())
}

/// The file format in words.
fn format_name(c: &Contents) -> &'static str {
    match c.format {
        engine::import::Format::Pth => "torch.save zip format (PyTorch ≥ 1.6)",
        engine::import::Format::PthLegacy => "torch.save legacy format (PyTorch < 1.6)",
        engine::import::Format::Safetensors => "safetensors",
    }
}

/// The number of values of `tensors`, in thousands or millions.
fn values(tensors: &[TensorInfo]) -> String {
    let n: usize = tensors
        .iter()
        .map(|t| t.dims.iter().product::<usize>())
        .sum();
    match n {
        0..=9_999 => n.to_string(),
        10_000..=9_999_999 => format!("{:.1} K", n as f64 / 1e3),
        _ => format!("{:.2} M", n as f64 / 1e6),
    }
}

/// How the names start (what all share, then the next part), a few of them with counts.
fn starts(tensors: &[TensorInfo]) -> String {
    let starts = engine::import::name_starts(tensors.iter().map(|t| t.name.as_str()));
    let shown: Vec<String> = starts
        .iter()
        .take(8)
        .map(|(s, n)| format!("`{s}` ({n})"))
        .collect();
    let more = if starts.len() > 8 {
        format!(", … {} more", starts.len() - 8)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

/// The holder the import reads (with `--key`, or by default), or `None` after saying why
/// there is none.
fn chosen(c: &Contents) -> Result<Option<&Holder>> {
    match &c.read {
        Ok(i) => Ok(Some(&c.holders[*i])),
        Err(why) => {
            outln!("  the import finds no state dict: {why}");
            Ok(None)
        }
    }
}

fn select(sel: &Selection) -> Select<'_> {
    Select {
        key: sel.key.as_deref(),
        prefix: sel.prefix.as_deref(),
    }
}

/// Which of our models the picked tensors are (`sel.model`, or guessed), checked by importing
/// them as an `import` stage does, and the stage to write.
fn check_model(
    path: &Path,
    holder: &Holder,
    picked: &[(String, &TensorInfo)],
    sel: &Selection,
) -> Result<()> {
    let where_ = match (&holder.key, &sel.key) {
        (Some(k), Some(_)) => format!("key `{k}`"),
        (Some(k), None) => format!("key `{k}` (found without one)"),
        (None, _) => "the top level".to_owned(),
    };
    let prefix = sel
        .prefix
        .as_ref()
        .map_or(String::new(), |p| format!(", prefix `{p}`"));
    outln!(
        "  the import reads {where_}{prefix}: {} tensors",
        picked.len()
    );
    if picked.is_empty() {
        outln!(
            "    no name starts with the prefix; the names start {}",
            starts(&holder.tensors)
        );
        return Ok(());
    }
    let guess = engine::import::model_of(picked.iter().map(|(n, t)| (n.as_str(), &t.dims[..])));
    let Some(model) = sel.model.clone().or(guess) else {
        outln!(
            "  model: none of ours has these names and shapes; --model names one to see where \
             it differs"
        );
        if sel.prefix.is_none() {
            networks_under_prefixes(picked)?;
        }
        return Ok(());
    };
    let check = || -> Result<String> {
        let arch = engine::models::Arch::parse(&model)?;
        let state = engine::import::read(path, select(sel), arch)?;
        let spec = state.spec(path, &model, 0.0)?;
        let m = state.into_model(path, &spec, &candle_core::Device::Cpu)?;
        Ok(format!(
            "{} parameters, width {}, {} classes, {} input channels, {:?} stem, shortcut {:?}",
            m.parameter_count(),
            spec.width,
            spec.classes,
            spec.in_channels,
            spec.stem,
            spec.shortcut
        ))
    };
    match check() {
        Ok(what) => {
            outln!("  model: {model} — every tensor's name and shape checked: {what}");
            stage_toml(path, &model, sel)?;
        }
        Err(e) => outln!("  model: {model} does not load: {e:#}"),
    }
    Ok(())
}

/// The networks of ours found under each name start (MoCo's `module.encoder_q.` and
/// `module.encoder_k.`), for `--prefix`.
fn networks_under_prefixes(picked: &[(String, &TensorInfo)]) -> Result<()> {
    let starts = engine::import::name_starts(picked.iter().map(|(n, _)| n.as_str()));
    for start in starts.keys().filter(|s| s.ends_with('.')) {
        let under = picked
            .iter()
            .filter_map(|(n, t)| Some((n.strip_prefix(start)?, &t.dims[..])));
        if let Some(model) = engine::import::model_of(under) {
            outln!("    under `{start}`: a {model} (--prefix {start} checks it)");
        }
    }
    Ok(())
}

/// The `import` stage for these choices, to paste into stages.toml.
fn stage_toml(path: &Path, model: &str, sel: &Selection) -> Result<()> {
    outln!("  as a stage (path relative to the stages.toml):");
    outln!("    [[stage]]");
    outln!("    name = \"teacher\"");
    outln!("    kind = \"import\"");
    outln!("    path = {:?}", path.display().to_string());
    outln!("    model = {model:?}");
    if let Some(k) = &sel.key {
        outln!("    key = {k:?}");
    }
    if let Some(p) = &sel.prefix {
        outln!("    prefix = {p:?}");
    }
    Ok(())
}
