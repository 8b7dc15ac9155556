//! `adapter_config.json`: [`AdapterConfig::parse`] reads and checks it as PEFT's `LoraConfig` reads it
//! (refusing every setting loraserve would have to ignore, warning about keys `LoraConfig` lacks, as PEFT
//! does), and its matcher picks the base's modules and their ranks and alphas as PEFT does (see the parent
//! module's header).

use fancy_regex::Regex;
use serde_json::{Map, Value};

use super::AdapterError;

/// `target_modules` / `exclude_modules`.
#[derive(Clone, Debug, PartialEq)]
pub enum ModuleSelector {
    Names(Vec<String>),
    /// Python regex matched against the whole module name.
    Regex(String),
    /// Every linear layer except the output layer.
    AllLinear,
}

/// A parsed, supported `adapter_config.json`.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: ModuleSelector,
    pub exclude_modules: Option<ModuleSelector>,
    /// In file order (the first matching key wins, as in PEFT).
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    /// VeLoRA's `num_groups` when `velora_config` is set (each module then has a `lora_velora_embed`).
    pub velora_groups: Option<usize>,
    /// The raw JSON, for listing.
    pub raw: Map<String, Value>,
    /// Keys PEFT's `LoraConfig` does not have, which it ignores with a warning (a file from a newer PEFT):
    /// warned about at load the same way.
    pub ignored: Vec<String>,
}

/// The fields of PEFT's `LoraConfig` (peft 0.21, with those of `PeftConfig`): what `adapter_config.json`
/// may hold.
#[rustfmt::skip]
const LORA_CONFIG_KEYS: [&str; 42] = [
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config",
    "alora_invocation_tokens", "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication",
    "runtime_config", "lora_bias", "target_parameters", "use_bdlora", "arrow_config", "kasa_config",
    "ensure_weight_tying",
];

pub(super) fn cfg_err(file: &str, key: &str, reason: impl Into<String>) -> AdapterError {
    AdapterError::Config { file: file.to_string(), key: key.to_string(), reason: reason.into() }
}

fn compile(pattern: &str, anchored: &str, file: &str, key: &str) -> Result<Regex, AdapterError> {
    Regex::new(&anchored.replace("{}", pattern))
        .map_err(|e| cfg_err(file, key, format!("invalid regex `{pattern}`: {e}")))
}

/// `v` as a positive integer, else an error naming `key`.
fn positive(v: &Value, file: &str, key: &str) -> Result<usize, AdapterError> {
    v.as_u64()
        .filter(|n| *n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| cfg_err(file, key, format!("expected a positive integer, got {v}")))
}

/// Whether PEFT's `if config.<key>:` takes `v` as on: Python's truth value of the JSON.
fn is_set(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

impl AdapterConfig {
    /// Parses and checks `adapter_config.json` text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, AdapterError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| AdapterError::File { file: file.to_string(), reason: format!("invalid JSON: {e}") })?;
        let Value::Object(m) = v else {
            return Err(AdapterError::File { file: file.to_string(), reason: "top level is not an object".into() });
        };
        let get = |k: &str| m.get(k).filter(|v| !v.is_null());

        // PEFT picks the config class by `peft_type` and refuses a config without one.
        match get("peft_type") {
            None => return Err(cfg_err(file, "peft_type", "missing (PEFT writes \"LORA\" for a LoRA adapter)")),
            Some(t) if t.as_str() != Some("LORA") => {
                return Err(cfg_err(file, "peft_type", format!("only LORA adapters are supported, got {t}")))
            }
            Some(_) => {}
        }
        // Features whose effect loraserve cannot reproduce: refuse rather than serve something else.
        if is_set(get("use_dora")) {
            return Err(cfg_err(file, "use_dora", "DoRA adapters are not supported"));
        }
        if is_set(get("modules_to_save")) {
            return Err(cfg_err(file, "modules_to_save", "adapters that replace whole modules are not supported"));
        }
        match get("bias") {
            None => {}
            Some(Value::String(b)) if b == "none" => {}
            Some(other) => return Err(cfg_err(file, "bias", format!("only \"none\" is supported, got {other}"))),
        }
        if is_set(get("lora_bias")) {
            return Err(cfg_err(file, "lora_bias", "LoRA biases are not supported"));
        }
        if let Some(Value::String(init)) = get("init_lora_weights") {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq", "lora_ga"].iter().any(|p| lower.starts_with(p)) {
                return Err(cfg_err(
                    file,
                    "init_lora_weights",
                    format!("\"{init}\" changes the base weights, which a shared base cannot do"),
                ));
            }
        }
        // Variants with their own forward (or extra weights); `use_bdlora` is a settings object when on. PEFT
        // reads any value but null given as `monteclora_config` or `kasa_config` as that variant's settings
        // (`{}` switches it on; anything not an object fails there): refused here either way.
        for key in ["use_qalora", "use_bdlora", "monteclora_config", "arrow_config", "kasa_config"] {
            let on = match get(key) {
                v if key == "monteclora_config" || key == "kasa_config" => !matches!(v, None | Some(Value::Null)),
                v => is_set(v),
            };
            if on {
                return Err(cfg_err(file, key, "this LoRA variant is not supported"));
            }
        }
        for key in ["alora_invocation_tokens", "target_parameters", "trainable_token_indices", "layer_replication"] {
            if is_set(get(key)) {
                return Err(cfg_err(file, key, "not supported"));
            }
        }

        let r = match get("r") {
            None => 8, // PEFT's default (the tensors' shapes are checked against it)
            Some(v) => positive(v, file, "r")?,
        };
        let lora_alpha = match get("lora_alpha") {
            None => 8.0, // PEFT's default
            Some(v) => v
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| cfg_err(file, "lora_alpha", format!("expected a number, got {v}")))?,
        };
        let use_rslora = match get("use_rslora") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(cfg_err(file, "use_rslora", format!("expected true or false, got {v}"))),
        };
        let target_modules = match get("target_modules") {
            // PEFT fills in its default for the model type: q_proj and v_proj for Llama, Mistral and Qwen2.
            None | Some(Value::Null) => ModuleSelector::Names(vec!["q_proj".into(), "v_proj".into()]),
            Some(v) => selector(v, file, "target_modules")?,
        };
        let exclude_modules = match get("exclude_modules") {
            None => None,
            Some(v) => Some(selector(v, file, "exclude_modules")?),
        };
        let rank_pattern = pattern_map(get("rank_pattern"), file, "rank_pattern", |v| {
            v.as_u64().filter(|r| *r > 0).map(|r| r as usize)
        })?;
        let alpha_pattern =
            pattern_map(get("alpha_pattern"), file, "alpha_pattern", |v| v.as_f64().filter(|a| a.is_finite()))?;
        let layers_to_transform = match get("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| cfg_err(file, "layers_to_transform", "expected a layer index"))?
                as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| cfg_err(file, "layers_to_transform", format!("{x} is not a layer index")))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(v) => {
                return Err(cfg_err(file, "layers_to_transform", format!("expected an index or a list, got {v}")))
            }
        };
        // PEFT reads an empty pattern (`""` or `[]`) as none: the default layer regex.
        let layers_pattern = match get("layers_pattern") {
            None => Vec::new(),
            Some(Value::String(s)) if s.is_empty() => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| cfg_err(file, "layers_pattern", format!("{x} is not a pattern")))
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(cfg_err(file, "layers_pattern", format!("expected a string or a list, got {v}"))),
        };
        // `LoraConfig.__post_init__` refuses these combinations: a regex names layers itself, and a layer
        // pattern alone selects nothing.
        if matches!(target_modules, ModuleSelector::Regex(_) | ModuleSelector::AllLinear) {
            for key in ["layers_to_transform", "layers_pattern"] {
                if get(key).is_some() {
                    return Err(cfg_err(file, key, "cannot be used when `target_modules` is a string"));
                }
            }
        }
        if !layers_pattern.is_empty() && layers_to_transform.is_none() {
            return Err(cfg_err(file, "layers_pattern", "given without `layers_to_transform`"));
        }
        // PEFT reads any object, `{}` too, as a VeloraConfig (num_groups defaults to 64).
        let velora_groups = match get("velora_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(match o.get("num_groups") {
                None => 64,
                Some(n) => positive(n, file, "velora_config.num_groups")?,
            }),
            Some(v) => return Err(cfg_err(file, "velora_config", format!("expected a settings object, got {v}"))),
        };
        let ignored: Vec<String> = m.keys().filter(|k| !LORA_CONFIG_KEYS.contains(&k.as_str())).cloned().collect();
        if !ignored.is_empty() {
            tracing::warn!(file, keys = ?ignored, "adapter config keys PEFT's LoraConfig does not have are ignored, as PEFT ignores them (a file from a newer PEFT?)");
        }
        let cfg = AdapterConfig {
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            exclude_modules,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layers_pattern,
            base_model_name_or_path: get("base_model_name_or_path").and_then(|v| v.as_str()).map(str::to_string),
            velora_groups,
            raw: m.clone(),
            ignored,
        };
        // Compile every pattern now so a bad regex is reported at load, naming its key.
        cfg.matcher(file)?;
        Ok(cfg)
    }

    pub(super) fn matcher(&self, file: &str) -> Result<Matcher, AdapterError> {
        let sel = |s: &ModuleSelector, key: &str| -> Result<CompiledSelector, AdapterError> {
            Ok(match s {
                ModuleSelector::Names(n) => CompiledSelector::Names(n.clone()),
                ModuleSelector::Regex(r) => CompiledSelector::Regex(compile(r, "^(?:{})$", file, key)?),
                ModuleSelector::AllLinear => CompiledSelector::AllLinear,
            })
        };
        let pat = |keys: Vec<&String>, name: &str| -> Result<Vec<Regex>, AdapterError> {
            keys.into_iter().map(|k| compile(k, r"^(.*\.)?({})$", file, &format!("{name}.{k}"))).collect()
        };
        Ok(Matcher {
            target: sel(&self.target_modules, "target_modules")?,
            exclude: self.exclude_modules.as_ref().map(|e| sel(e, "exclude_modules")).transpose()?,
            layer_index: if self.layers_pattern.is_empty() {
                vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("static regex")]
            } else {
                self.layers_pattern
                    .iter()
                    .map(|p| compile(p, r"^.*?\.{}\.(\d+)\.", file, "layers_pattern"))
                    .collect::<Result<_, _>>()?
            },
            rank: pat(self.rank_pattern.iter().map(|(k, _)| k).collect(), "rank_pattern")?,
            alpha: pat(self.alpha_pattern.iter().map(|(k, _)| k).collect(), "alpha_pattern")?,
        })
    }

    /// Rank and scale of module `key` after `rank_pattern` / `alpha_pattern`.
    pub(super) fn rank_and_scale(&self, m: &Matcher, key: &str) -> (usize, f32) {
        let r = first_match(&m.rank, key).map_or(self.r, |i| self.rank_pattern[i].1);
        let alpha = first_match(&m.alpha, key).map_or(self.lora_alpha, |i| self.alpha_pattern[i].1);
        let scale = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scale as f32)
    }
}

fn selector(v: &Value, file: &str, key: &str) -> Result<ModuleSelector, AdapterError> {
    match v {
        // PEFT's shorthand, in any case; `exclude_modules` has none (there it is a regex like any other).
        Value::String(s) if key == "target_modules" && s.eq_ignore_ascii_case("all-linear") => {
            Ok(ModuleSelector::AllLinear)
        }
        Value::String(s) => Ok(ModuleSelector::Regex(s.clone())),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| cfg_err(file, key, format!("{x} is not a module name")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(ModuleSelector::Names),
        other => Err(cfg_err(file, key, format!("expected a list of names or a regex string, got {other}"))),
    }
}

fn pattern_map<T>(
    v: Option<&Value>,
    file: &str,
    key: &str,
    parse: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<(String, T)>, AdapterError> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| {
                parse(v)
                    .map(|t| (k.clone(), t))
                    .ok_or_else(|| cfg_err(file, &format!("{key}.{k}"), format!("invalid value {v}")))
            })
            .collect(),
        Some(other) => Err(cfg_err(file, key, format!("expected an object, got {other}"))),
    }
}

enum CompiledSelector {
    Names(Vec<String>),
    Regex(Regex),
    AllLinear,
}

impl CompiledSelector {
    /// PEFT: an exact name, or a name the key ends with after a dot; a regex must match the whole key.
    fn matches(&self, key: &str) -> bool {
        match self {
            CompiledSelector::Names(names) => names.iter().any(|n| key == n || key.ends_with(&format!(".{n}"))),
            CompiledSelector::Regex(r) => r.is_match(key).unwrap_or(false),
            CompiledSelector::AllLinear => true,
        }
    }
}

pub(super) struct Matcher {
    target: CompiledSelector,
    exclude: Option<CompiledSelector>,
    layer_index: Vec<Regex>,
    rank: Vec<Regex>,
    alpha: Vec<Regex>,
}

fn first_match(patterns: &[Regex], key: &str) -> Option<usize> {
    patterns.iter().position(|r| r.is_match(key).unwrap_or(false))
}

impl Matcher {
    /// Runs every pattern on every key the adapter is matched against, so that a pattern the regex engine
    /// gives up on (its backtracking limit) is an error naming it, not a silent "no match" (Python's `re`
    /// would match it). After this, the matching methods meet no error on these keys.
    pub(super) fn check_keys<'k>(
        &self,
        cfg: &AdapterConfig,
        keys: impl Iterator<Item = &'k str>,
        file: &str,
    ) -> Result<(), AdapterError> {
        let mut all: Vec<(&Regex, String)> = vec![];
        for (sel, field) in [(Some(&self.target), "target_modules"), (self.exclude.as_ref(), "exclude_modules")] {
            if let Some(CompiledSelector::Regex(r)) = sel {
                all.push((r, field.to_string()));
            }
        }
        all.extend(self.layer_index.iter().map(|r| (r, "layers_pattern".to_string())));
        all.extend(self.rank.iter().zip(&cfg.rank_pattern).map(|(r, (k, _))| (r, format!("rank_pattern.{k}"))));
        all.extend(self.alpha.iter().zip(&cfg.alpha_pattern).map(|(r, (k, _))| (r, format!("alpha_pattern.{k}"))));
        for key in keys {
            for (r, field) in &all {
                if let Err(e) = r.is_match(key) {
                    return Err(cfg_err(file, field, format!("matching it against `{key}` failed: {e}")));
                }
            }
        }
        Ok(())
    }

    /// `check_target_module_exists` for a linear layer of the base.
    pub(super) fn targets(&self, cfg: &AdapterConfig, key: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(key)) {
            return false;
        }
        if !self.target.matches(key) {
            return false;
        }
        // A module named in full is targeted whatever its layer (PEFT checks `key in target_modules` first).
        if matches!(&self.target, CompiledSelector::Names(names) if names.iter().any(|n| n == key)) {
            return true;
        }
        // Layer filtering (only name lists have it: `parse` refuses it beside a regex or all-linear).
        let Some(layers) = &cfg.layers_to_transform else { return true };
        if layers.is_empty() {
            return true;
        }
        self.layer_index
            .iter()
            .find_map(|r| r.captures(key).ok().flatten())
            .and_then(|c| c.get(1)?.as_str().parse::<usize>().ok())
            .is_some_and(|i| layers.contains(&i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: Value) -> Result<AdapterConfig, String> {
        let mut m = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
        m.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        AdapterConfig::parse(&m.to_string(), "a/adapter_config.json").map_err(|e| e.to_string())
    }

    /// PEFT switches a feature on by the Python truth value of its setting (`if self.use_dora:`): `1` and
    /// `"true"` are on, and refused as `true` is; `0`, `""` and `false` are off. Before, only `true` was read as on,
    /// so `"use_dora": 1` served plain LoRA where PEFT serves DoRA.
    #[test]
    fn switches_are_read_by_their_python_truth_value() {
        use serde_json::json;
        for (key, on) in
            [("use_dora", json!(1)), ("use_dora", json!("true")), ("lora_bias", json!(1.5)), ("bias", json!(true))]
        {
            let e = parse(json!({ key: on })).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{key}={on}: {e}");
        }
        for off in [json!(0), json!(0.0), json!(""), json!(false), json!(null), json!([])] {
            parse(json!({"use_dora": off, "lora_bias": off})).unwrap();
        }
    }

    /// Keys `LoraConfig` lacks are ignored, as PEFT ignores them (with a warning): listed, and nothing else is.
    #[test]
    fn keys_peft_lacks_are_listed_as_ignored() {
        use serde_json::json;
        let cfg =
            parse(json!({"some_future_option": {"x": 1}, "megatron_config": null, "inference_mode": true})).unwrap();
        assert_eq!(cfg.ignored, ["some_future_option"]);
        let written = super::super::config_json(
            &super::super::AdapterMeta {
                r: 4,
                lora_alpha: 8.0,
                use_rslora: false,
                lora_dropout: 0.0,
                base_model_name_or_path: "m".into(),
                dtype: candle_core::DType::F32,
            },
            &[crate::lora::ModuleKind::QProj],
        );
        let cfg = AdapterConfig::parse(&written.to_string(), "a/adapter_config.json").unwrap();
        assert!(cfg.ignored.is_empty(), "what `train` writes is all known: {:?}", cfg.ignored);
    }
}
