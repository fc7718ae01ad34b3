//! The wire format of OpenAI's legacy completions API, as FauxPilot and the editors speak it: the
//! request read field by field into a typed `CompletionRequest` (an error names the field), the
//! response and stream-chunk JSON, and OpenAI's error object.

use serde_json::{json, Map, Value};

/// A client's mistake or a refusal, as OpenAI reports it: an HTTP status and an error object.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into(), kind: "invalid_request_error", param: Some(param), code: None }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// A prompt as text, or as token ids (OpenAI accepts both).
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// A completions request, validated (OpenAI's names, defaults and ranges).
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    /// Echoed back; any string.
    pub model: String,
    pub prompts: Vec<PromptInput>,
    /// The text after the insertion point: a FIM model fills in between prompt and suffix.
    pub suffix: Option<String>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Alternatives per token with its log-probability; None: no logprobs.
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub seed: Option<u64>,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
}

/// Reads a request body. Unknown fields (Copilot's `extra`, `nwo`, ...) and the fields the engine
/// cannot use (`best_of`, `logit_bias`, `user`) are accepted and ignored.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError { param: None, ..ApiError::invalid("", format!("the request body is not valid JSON: {e}")) })?;
    let Value::Object(fields) = value else {
        return Err(ApiError { param: None, ..ApiError::invalid("", "the request body must be a JSON object") });
    };
    let f = Fields(&fields);
    let prompts = match fields.get("prompt") {
        None | Some(Value::Null) => vec![PromptInput::Text(String::new())],
        Some(Value::String(text)) => vec![PromptInput::Text(text.clone())],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) && !items.is_empty() => {
            items.iter().map(|v| PromptInput::Text(v.as_str().unwrap_or_default().to_string())).collect()
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) && !items.is_empty() => vec![token_prompt(items)?],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(|v| v.as_array().is_some_and(|a| !a.is_empty())) => {
            items.iter().map(|v| token_prompt(v.as_array().expect("checked"))).collect::<Result<_, _>>()?
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("'prompt' must be a string, a list of strings, or token ids; got {}", describe(other)),
            ))
        }
    };
    let logprobs = f.integer("logprobs", None, 0, 5)?;
    let stop = match fields.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) && items.len() <= 4 => {
            items.iter().filter_map(Value::as_str).map(str::to_string).collect()
        }
        Some(other) => {
            return Err(ApiError::invalid("stop", format!("'stop' must be a string or a list of up to 4 strings; got {}", describe(other))))
        }
    };
    Ok(CompletionRequest {
        model: f.string("model")?.unwrap_or_else(|| "codegen".into()),
        prompts,
        suffix: f.string("suffix")?,
        max_tokens: f.integer("max_tokens", Some(16), 0, u32::MAX as u64)?.unwrap_or(16) as usize,
        temperature: f.number("temperature", 1.0, 0.0, 2.0)?,
        top_p: f.number("top_p", 1.0, 0.0, 1.0)?,
        top_k: f.integer("top_k", Some(0), 0, u32::MAX as u64)?.unwrap_or(0) as usize,
        n: f.integer("n", Some(1), 1, 128)?.unwrap_or(1) as usize,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        stream: f.boolean("stream")?,
        logprobs: logprobs.map(|l| l as usize),
        echo: f.boolean("echo")?,
        seed: f.seed()?,
        presence_penalty: f.number("presence_penalty", 0.0, -2.0, 2.0)?,
        frequency_penalty: f.number("frequency_penalty", 0.0, -2.0, 2.0)?,
    })
}

fn token_prompt(items: &[Value]) -> Result<PromptInput, ApiError> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|i| u32::try_from(i).ok()))
        .collect::<Option<Vec<u32>>>()
        .map(PromptInput::Tokens)
        .ok_or_else(|| ApiError::invalid("prompt", "token-id prompts must hold non-negative integers"))
}

/// The request's fields, read with their types and ranges checked.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &'static str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::invalid(name, format!("'{name}' must be a string; got {}", describe(other)))),
        }
    }

    fn boolean(&self, name: &'static str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(ApiError::invalid(name, format!("'{name}' must be true or false; got {}", describe(other)))),
        }
    }

    fn number(&self, name: &'static str, default: f64, min: f64, max: f64) -> Result<f64, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if (min..=max).contains(&x) {
                    Ok(x)
                } else {
                    Err(ApiError::invalid(name, format!("'{name}' must be between {min} and {max}; got {x}")))
                }
            }
            Some(other) => Err(ApiError::invalid(name, format!("'{name}' must be a number; got {}", describe(other)))),
        }
    }

    fn integer(&self, name: &'static str, default: Option<u64>, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Number(n)) if n.as_u64().is_some_and(|i| (min..=max).contains(&i)) => Ok(n.as_u64()),
            Some(other) => {
                Err(ApiError::invalid(name, format!("'{name}' must be an integer from {min} to {max}; got {}", describe(other))))
            }
        }
    }

    fn seed(&self) -> Result<Option<u64>, ApiError> {
        match self.get("seed") {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() || n.as_u64().is_some() => {
                Ok(n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)))
            }
            Some(other) => Err(ApiError::invalid("seed", format!("'seed' must be an integer; got {}", describe(other)))),
        }
    }
}

/// A value as an error message shows it: short, and never the whole of a long string (a prompt
/// may hold anything).
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) if s.chars().count() > 20 => "a string".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        other => other.to_string(),
    }
}

/// The legacy `logprobs` object of one choice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChoiceLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<Vec<(String, f32)>>>,
    pub text_offset: Vec<usize>,
}

impl ChoiceLogprobs {
    pub fn to_json(&self) -> Value {
        let top: Vec<Value> = self
            .top_logprobs
            .iter()
            .map(|alternatives| match alternatives {
                None => Value::Null,
                Some(list) => Value::Object(list.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect()),
            })
            .collect();
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": top, "text_offset": self.text_offset})
    }

    /// The entries from `from` on (a stream chunk's share).
    pub fn tail(&self, from: usize) -> Self {
        Self {
            tokens: self.tokens[from..].to_vec(),
            token_logprobs: self.token_logprobs[from..].to_vec(),
            top_logprobs: self.top_logprobs[from..].to_vec(),
            text_offset: self.text_offset[from..].to_vec(),
        }
    }
}

/// How a choice ended, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// max_tokens, or the context.
    Length,
}

impl FinishReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One finished choice.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub index: usize,
    pub text: String,
    pub finish_reason: FinishReason,
    pub logprobs: Option<ChoiceLogprobs>,
}

/// What identifies a response and each of its chunks.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// The whole response of a request that did not stream.
pub fn completion_json(head: &ResponseHead, choices: &[Choice], prompt_tokens: usize, completion_tokens: usize) -> Value {
    let choices: Vec<Value> = choices
        .iter()
        .map(|c| {
            json!({"text": c.text, "index": c.index, "logprobs": c.logprobs.as_ref().map(ChoiceLogprobs::to_json),
                   "finish_reason": c.finish_reason.as_str()})
        })
        .collect();
    json!({
        "id": head.id, "object": "text_completion", "created": head.created, "model": head.model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    })
}

/// One server-sent event of a stream: new text for one choice, and its end on its last chunk.
pub fn chunk_json(head: &ResponseHead, index: usize, text: &str, logprobs: Option<&ChoiceLogprobs>, finish: Option<FinishReason>) -> Value {
    json!({
        "id": head.id, "object": "text_completion", "created": head.created, "model": head.model,
        "choices": [{"text": text, "index": index, "logprobs": logprobs.map(ChoiceLogprobs::to_json),
                     "finish_reason": finish.map(FinishReason::as_str)}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<CompletionRequest, ApiError> {
        parse_completion(body.as_bytes())
    }

    #[test]
    fn the_fauxpilot_extensions_request_reads_with_openai_defaults() {
        let r = parse(r#"{"model":"fastertransformer","prompt":"def f(","max_tokens":200,"temperature":0.1,"stop":["\n"]}"#).unwrap();
        assert_eq!(r.model, "fastertransformer");
        assert_eq!(r.prompts, [PromptInput::Text("def f(".into())]);
        assert_eq!((r.max_tokens, r.temperature, r.n, r.stream, r.echo), (200, 0.1, 1, false, false));
        assert_eq!(r.stop, ["\n"]);
        let d = parse("{}").unwrap();
        assert_eq!((d.max_tokens, d.temperature, d.top_p, d.logprobs, d.stop.len()), (16, 1.0, 1.0, None, 0));
    }

    #[test]
    fn unknown_and_unused_fields_are_ignored_and_prompt_forms_are_read() {
        let r = parse(r#"{"prompt":["a","b"],"suffix":"x","extra":{"language":"py"},"nwo":"o/r","best_of":2,"stop":"\n\n","seed":-3}"#)
            .unwrap();
        assert_eq!(r.prompts.len(), 2);
        assert_eq!((r.stop.clone(), r.seed), (vec!["\n\n".to_string()], Some(-3i64 as u64)));
        assert_eq!(r.suffix.as_deref(), Some("x"));
        assert_eq!(parse(r#"{"suffix":null}"#).unwrap().suffix, None);
        assert_eq!(parse(r#"{"prompt":[1,2,3]}"#).unwrap().prompts, [PromptInput::Tokens(vec![1, 2, 3])]);
        assert_eq!(parse(r#"{"prompt":[[1],[2,3]]}"#).unwrap().prompts.len(), 2);
        assert_eq!(parse(r#"{"max_tokens":null,"stream":null}"#).unwrap().max_tokens, 16);
    }

    #[test]
    fn wrong_types_and_ranges_name_the_field() {
        for (body, param) in [
            (r#"{"temperature":"hot"}"#, "temperature"),
            (r#"{"temperature":3}"#, "temperature"),
            (r#"{"top_p":1.5}"#, "top_p"),
            (r#"{"max_tokens":-1}"#, "max_tokens"),
            (r#"{"max_tokens":2.5}"#, "max_tokens"),
            (r#"{"n":0}"#, "n"),
            (r#"{"logprobs":6}"#, "logprobs"),
            (r#"{"stream":"yes"}"#, "stream"),
            (r#"{"prompt":5}"#, "prompt"),
            (r#"{"prompt":[-1]}"#, "prompt"),
            (r#"{"stop":[1]}"#, "stop"),
            (r#"{"suffix":["x"]}"#, "suffix"),
            (r#"{"model":1}"#, "model"),
            (r#"{"seed":"x"}"#, "seed"),
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!((err.status, err.param), (400, Some(param)), "{body}: {err:?}");
            assert!(err.message.contains(param), "{body}: {}", err.message);
        }
        let err = parse("{not json").unwrap_err();
        assert_eq!((err.status, err.kind), (400, "invalid_request_error"));
        assert!(parse("[1]").unwrap_err().message.contains("JSON object"));
        let long = format!(r#"{{"prompt":{{"secret":"{}"}}}}"#, "k".repeat(40));
        assert!(!parse(&long).unwrap_err().message.contains("kkkk"), "a value is never echoed whole");
    }

    #[test]
    fn responses_have_openais_shape() {
        let head = ResponseHead { id: "cmpl-1".into(), created: 7, model: "m".into() };
        let choice = Choice { index: 0, text: "x".into(), finish_reason: FinishReason::Length, logprobs: None };
        let v = completion_json(&head, &[choice], 3, 1);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 4);
        let c = chunk_json(&head, 2, "y", None, None);
        assert_eq!((c["choices"][0]["index"].as_u64(), c["choices"][0]["finish_reason"].is_null()), (Some(2), true));
        let e = ApiError::invalid("n", "bad").body();
        assert_eq!(e["error"]["param"], "n");
        assert!(e["error"]["code"].is_null());
    }
}
