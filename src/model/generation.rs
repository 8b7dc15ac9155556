//! The sampling defaults of a model's `generation_config.json`, for requests that leave them unset
//! (`--generation-config auto`): `temperature`, `top_p`, `top_k`, `min_p` and `repetition_penalty`, five of the
//! six keys vLLM reads. Like vLLM, `do_sample` is not read (a config with `do_sample: false` and a temperature
//! samples at that temperature). Unlike vLLM: `max_new_tokens` is not read (a request's `max_new_tokens` is
//! required; `--max-new-tokens-cap` bounds it); a value equal to transformers' own default is applied (vLLM
//! reads the file through `to_diff_dict`, which leaves such values out); and with neither the request nor
//! the model setting a temperature, the request is greedy (vLLM's OpenAI server samples at 1.0).

use serde_json::Value;

use super::ConfigError;

/// Sampling settings that may be unset: a model's defaults, or what a request (or a command line) gave.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// The settings `generation_config.json` (parsed, from `file`) sets; `null` is unset. A value of the
    /// wrong type is an error naming it (ranges are checked where the defaults are used).
    pub fn from_json(v: &Value, file: &str) -> Result<Self, ConfigError> {
        let number = |field: &str| -> Result<Option<f64>, ConfigError> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_f64().map(Some).ok_or_else(|| ConfigError::Invalid {
                    file: file.to_string(),
                    field: field.to_string(),
                    reason: format!("expected a number, got {x}"),
                }),
            }
        };
        let top_k = match number("top_k")? {
            None => None,
            // vLLM's -1 (and any k ≤ 0) is no filter: 0 here.
            Some(k) if k.fract() == 0.0 && k <= 0.0 => Some(0),
            Some(k) if k.fract() == 0.0 && k <= u32::MAX as f64 => Some(k as u32),
            Some(k) => {
                return Err(ConfigError::Invalid {
                    file: file.to_string(),
                    field: "top_k".into(),
                    reason: format!("expected a whole number, got {k}"),
                })
            }
        };
        Ok(GenerationDefaults {
            temperature: number("temperature")?.map(|x| x as f32),
            top_p: number("top_p")?.map(|x| x as f32),
            top_k,
            min_p: number("min_p")?.map(|x| x as f32),
            repetition_penalty: number("repetition_penalty")?.map(|x| x as f32),
        })
    }

    /// `self`'s settings, and `fallback`'s where `self` has none.
    pub fn or(self, fallback: GenerationDefaults) -> Self {
        GenerationDefaults {
            temperature: self.temperature.or(fallback.temperature),
            top_p: self.top_p.or(fallback.top_p),
            top_k: self.top_k.or(fallback.top_k),
            min_p: self.min_p.or(fallback.min_p),
            repetition_penalty: self.repetition_penalty.or(fallback.repetition_penalty),
        }
    }

    /// Whether no setting is given.
    pub fn is_empty(&self) -> bool {
        *self == GenerationDefaults::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-Instruct's settings read as given; `null` and absent keys are unset; wrong types name the field.
    #[test]
    fn the_sampling_settings_of_a_generation_config() {
        let v = serde_json::json!({"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
            "repetition_penalty": 1.05, "min_p": null, "eos_token_id": [1, 2]});
        let d = GenerationDefaults::from_json(&v, "g.json").unwrap();
        let want = GenerationDefaults {
            temperature: Some(0.7),
            top_p: Some(0.8),
            top_k: Some(20),
            min_p: None,
            repetition_penalty: Some(1.05),
        };
        assert_eq!(d, want);
        assert!(GenerationDefaults::from_json(&serde_json::json!({"eos_token_id": 2}), "g.json").unwrap().is_empty());
        let off = GenerationDefaults::from_json(&serde_json::json!({"top_k": -1}), "g.json").unwrap();
        assert_eq!(off.top_k, Some(0), "vLLM's -1: no filter");
        let given = GenerationDefaults { temperature: Some(0.0), ..Default::default() };
        assert_eq!(given.or(d), GenerationDefaults { temperature: Some(0.0), ..want });
        for (bad, field) in
            [(serde_json::json!({"temperature": "hot"}), "temperature"), (serde_json::json!({"top_k": 2.5}), "top_k")]
        {
            let e = GenerationDefaults::from_json(&bad, "g.json").unwrap_err().to_string();
            assert!(e.starts_with(&format!("g.json: field `{field}`")), "{e}");
        }
    }
}
