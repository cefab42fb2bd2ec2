//! How stage parameters are written down: every kind's `Params` states its defaults once, in a
//! `Default` impl, and names the keys that are left out of its serialised form (and so of its
//! fingerprint and `stage.json`) while they hold their default value. Keys added after a kind
//! first shipped are such keys: adding them changed no existing stage's fingerprint.
//!
//! A kind derives `Serialize` and `Deserialize` with `#[serde(remote = "Self")]`, which turns
//! the derived code into the inherent functions `Params::serialize` and `Params::deserialize`,
//! and [`stage_params!`] implements the traits through [`serialize`] and the derived
//! deserializer (and [`ParamDefaults`] from the lists it is given). Missing
//! keys take the `Default` impl's values (`#[serde(default)]` on the struct); keys without a
//! meaningful default are listed in [`ParamDefaults::REQUIRED`] and checked where stages.toml is
//! read.

use serde::{Serialize, Serializer};

/// A stage kind's parameters: their defaults and the keys omitted at their default.
pub trait ParamDefaults: Default {
    /// Keys written only when they differ from the `Default` impl's value.
    const OMITTED_AT_DEFAULT: &'static [&'static str];
    /// Keys a stage of this kind must set (their `Default` values are placeholders).
    const REQUIRED: &'static [&'static str] = &[];
    /// Serialises every key (the derived serializer).
    fn serialize_all<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error>;
}

/// Serialises `p` with its keys of [`ParamDefaults::OMITTED_AT_DEFAULT`] left out where they hold
/// their default value; the other keys keep the derived order.
pub fn serialize<P: ParamDefaults, S: Serializer>(p: &P, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::Error;
    let all = |v: &P| {
        v.serialize_all(serde_json::value::Serializer)
            .map_err(S::Error::custom)
    };
    let mut value = all(p)?;
    if let (Some(map), serde_json::Value::Object(defaults)) =
        (value.as_object_mut(), all(&P::default())?)
    {
        for key in P::OMITTED_AT_DEFAULT {
            if map.get(*key).is_some_and(|v| defaults.get(*key) == Some(v)) {
                map.remove(*key);
            }
        }
    }
    value.serialize(s)
}

/// Implements [`ParamDefaults`], `Serialize` (through [`serialize`]) and `Deserialize` (the
/// derived deserializer) for a kind's `Params`, which derives both with
/// `#[serde(remote = "Self")]`:
///
/// ```ignore
/// params::stage_params! {
///     Params,
///     omitted: ["seed", "top_k"],
///     required: ["method"], // optional
/// }
/// ```
macro_rules! stage_params {
    (
        $ty:ident,
        omitted: [$($omitted:literal),* $(,)?]
        $(, required: [$($required:literal),* $(,)?])? $(,)?
    ) => {
        impl $crate::params::ParamDefaults for $ty {
            const OMITTED_AT_DEFAULT: &'static [&'static str] = &[$($omitted),*];
            $(const REQUIRED: &'static [&'static str] = &[$($required),*];)?
            fn serialize_all<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                $ty::serialize(self, s)
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                $crate::params::serialize(self, s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                $ty::deserialize(d)
            }
        }
    };
}
pub(crate) use stage_params;

/// A key's value out of range: the key and what was expected.
pub type RangeError = (&'static str, String);

/// `v` must be a finite number > 0.
pub fn positive(key: &'static str, v: f64) -> Result<(), RangeError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err((key, format!("must be a positive number, found {v}")))
    }
}

/// `v` must be at least `min`.
pub fn at_least(key: &'static str, v: usize, min: usize) -> Result<(), RangeError> {
    if v >= min {
        Ok(())
    } else {
        Err((key, format!("must be at least {min}, found {v}")))
    }
}

/// `v` must lie in [0, 1).
pub fn below_one(key: &'static str, v: f64) -> Result<(), RangeError> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err((key, format!("must be in [0, 1), found {v}")))
    }
}
