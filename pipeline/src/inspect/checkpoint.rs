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
    if contents.places > engine::import::SHOWN {
        outln!(
            "    ({} places, the {} shallowest shown)",
            contents.places,
            engine::import::SHOWN
        );
    }
    for h in &contents.holders {
        let key = h.key.as_deref().unwrap_or("(top level)");
        let n = h.tensors.len();
        outln!(
            "    {key:<24} {n} tensor{}, {} values: {}",
            if n == 1 { "" } else { "s" },
            values(&h.tensors),
            h.what
        );
        outln!("    {:<24} names start {}", "", starts(&h.tensors));
        if let Some(e) = &h.error {
            outln!("    {:<24} cannot list the rest: {e}", "");
        }
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
    // In floating point: a damaged file's shapes can overflow any integer.
    let n: f64 = tensors
        .iter()
        .map(|t| t.dims.iter().map(|&d| d as f64).product::<f64>())
        .sum();
    match n {
        n if n < 1e4 => format!("{n}"),
        n if n < 1e7 => format!("{:.1} K", n / 1e3),
        n => format!("{:.2} M", n / 1e6),
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
    if let Some(e) = &holder.error {
        outln!("    not all its tensors can be listed: {e}");
    }
    if picked.is_empty() {
        match &sel.prefix {
            Some(_) if !holder.tensors.is_empty() => outln!(
                "    no name starts with the prefix; the names start {}",
                starts(&holder.tensors)
            ),
            _ => outln!("    no tensors to check"),
        }
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

/// The networks of ours found under each of the first 16 name starts (MoCo's
/// `module.encoder_q.` and `module.encoder_k.`), for `--prefix`.
fn networks_under_prefixes(picked: &[(String, &TensorInfo)]) -> Result<()> {
    let starts = engine::import::name_starts(picked.iter().map(|(n, _)| n.as_str()));
    for start in starts.keys().filter(|s| s.ends_with('.')).take(16) {
        let under = picked
            .iter()
            .filter_map(|(n, t)| Some((n.strip_prefix(start)?, &t.dims[..])));
        if let Some(model) = engine::import::model_of(under) {
            outln!("    under `{start}`: a {model} (--prefix {start} checks it)");
        }
    }
    Ok(())
}

/// Prints the `import` stage for these choices, to paste into stages.toml.
fn stage_toml(path: &Path, model: &str, sel: &Selection) -> Result<()> {
    outln!("  as a stage:");
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    for line in stage_block(&path, model, sel).lines() {
        outln!("    {line}");
    }
    Ok(())
}

/// `s` as a TOML basic string: one line whatever it holds (a multi-line string would take the
/// indentation it is printed with), every control character escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `import` stage reading `path` (absolute, so valid wherever stages.toml is) as `model`
/// with `sel`'s key and prefix; every value a TOML string, escaped as TOML escapes.
fn stage_block(path: &Path, model: &str, sel: &Selection) -> String {
    let text = toml_string;
    let mut out = format!(
        "[[stage]]\nname = \"teacher\"\nkind = \"import\"\npath = {}\nmodel = {}\n",
        text(&path.to_string_lossy()),
        text(model)
    );
    if let Some(k) = &sel.key {
        out += &format!("key = {}\n", text(k));
    }
    if let Some(p) = &sel.prefix {
        out += &format!("prefix = {}\n", text(p));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stage block parses as TOML back to the same values, whatever characters the path,
    /// key and prefix hold (a decomposed accent, as macOS stores names, control characters,
    /// quotes, backslashes, a zero-width space).
    #[test]
    fn the_stage_block_is_toml_for_any_path_key_and_prefix() {
        let odd = "re\u{301} \"q\" \\ \t \n \r \u{1b} \u{7f} \0 \u{200b} \u{ad} \u{85}";
        let sel = Selection {
            key: Some(format!("run.{odd}")),
            prefix: Some(format!("{odd}.")),
            model: None,
        };
        let path = Path::new("/data/teachers").join(odd);
        // Indented as printed: a value must hold on one line.
        let block: String = stage_block(&path, "resnet20", &sel)
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect();
        let parsed: toml::Table = toml::from_str(&block).expect(&block);
        let stage = &parsed["stage"].as_array().unwrap()[0];
        assert_eq!(stage["path"].as_str(), path.to_str());
        assert_eq!(stage["model"].as_str(), Some("resnet20"));
        assert_eq!(stage["key"].as_str(), sel.key.as_deref());
        assert_eq!(stage["prefix"].as_str(), sel.prefix.as_deref());
        assert_eq!(stage["kind"].as_str(), Some("import"));
    }
}
