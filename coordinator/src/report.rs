//! `report.html`: one self-contained page for a run directory (finished, stopped, still running or
//! resumed): the curves of metrics.jsonl (train loss, eval loss, learning rate, tokens/s) as
//! inline SVG, the completion-eval table and six examples side by side, and the run's plan from
//! run.json. No script, font or image is fetched; everything the user's data put in it is
//! escaped.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use zerotune_hf::layout::{COMPLETION_EVAL_FILE, METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE, RUN_FILE};
use zerotune_proto::records::{CompletionEval, EvalModel, MetricRecord, Prediction, RunRecord, Scores};

use crate::error::{io_err, CoordinatorError, Result};

/// One curve: its title, the metrics.jsonl key it plots, and its points (step, value).
struct Curve {
    title: &'static str,
    key: &'static str,
    points: Vec<(f64, f64)>,
}

/// What a run dir holds now, each file as its record (absent ones empty).
struct RunFiles {
    run: Option<RunRecord>,
    records: Vec<MetricRecord>,
    eval: Option<CompletionEval>,
    predictions: Vec<Prediction>,
}

/// Writes `dir/report.html` from what the run dir holds now; returns its path.
pub fn write(dir: &Path) -> Result<PathBuf> {
    let records = read_jsonl(&dir.join(METRICS_FILE))?;
    if records.is_empty() && !dir.join(RUN_FILE).is_file() {
        return Err(CoordinatorError::Data {
            path: dir.into(),
            message: format!("holds neither {METRICS_FILE} nor {RUN_FILE}: not a run directory"),
        });
    }
    let files = RunFiles {
        run: read_json(&dir.join(RUN_FILE))?,
        records,
        eval: read_json(&dir.join(COMPLETION_EVAL_FILE))?,
        predictions: read_jsonl(&dir.join(PREDICTIONS_FILE))?,
    };
    let html = render(dir, &files);
    let path = dir.join(REPORT_FILE);
    let partial = zerotune_hf::layout::partial_path(&path, false);
    std::fs::write(&partial, html).map_err(io_err(&partial))?;
    std::fs::rename(&partial, &path).map_err(io_err(&path))?;
    Ok(path)
}

/// The record in a JSON file, None when it is missing.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| CoordinatorError::Data { path: path.into(), message: format!("not what zerotune writes there: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e).into()),
    }
}

/// The records of a JSON Lines file (none when it is missing); a torn last line (a run still
/// writing) is skipped.
fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(io_err(path)(e).into()),
    }
}

fn render(dir: &Path, files: &RunFiles) -> String {
    let curves = curves(&files.records);
    let mut page = String::new();
    let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>zerotune run {}</title><style>{STYLE}</style></head><body>\n",
        escape(&name)
    );
    let _ = writeln!(page, "<h1>Run <code>{}</code></h1>", escape(&dir.display().to_string()));
    page += &completion_section(files.eval.as_ref());
    page += "<h2>Training</h2><div class=\"curves\">\n";
    for curve in &curves {
        page += &svg(curve);
    }
    page += "</div>\n";
    page += &examples_section(&files.predictions);
    page += &plan_section(files.run.as_ref());
    page += "<p class=\"foot\">Written by zerotune from metrics.jsonl, run.json, completion_eval.json and predictions.jsonl.</p>\n</body></html>\n";
    page
}

fn curves(records: &[MetricRecord]) -> Vec<Curve> {
    type Value = fn(&MetricRecord) -> Option<f64>;
    let series = |key: &'static str, title: &'static str, value: Value| Curve {
        title,
        key,
        points: records.iter().filter_map(|r| Some((r.step()? as f64, value(r)?))).collect(),
    };
    vec![
        series("loss", "train loss", |r| Some(r.as_train()?.loss)),
        series("eval_loss", "eval loss", |r| Some(r.as_eval()?.eval_loss)),
        series("learning_rate", "learning rate", |r| Some(r.as_train()?.learning_rate)),
        series("tokens_per_second", "tokens/s", |r| r.as_train()?.tokens_per_second),
    ]
}

const W: f64 = 360.0;
const H: f64 = 200.0;
const PAD: f64 = 52.0;

/// A line chart of one curve: axes with their ranges, and one path through every point.
fn svg(curve: &Curve) -> String {
    let mut out = format!(
        "<figure><figcaption>{}</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{} against the step\">",
        curve.title, curve.title
    );
    let _ = write!(out, "<rect x=\"{PAD}\" y=\"8\" width=\"{}\" height=\"{}\" class=\"frame\"/>", W - PAD - 8.0, H - PAD - 8.0);
    if curve.points.is_empty() {
        out += &format!("<text x=\"{}\" y=\"{}\" class=\"none\">no {} yet</text></svg></figure>\n", W / 2.0, H / 2.0, curve.title);
        return out;
    }
    let (x0, x1) = range(curve.points.iter().map(|p| p.0));
    let (y0, y1) = range(curve.points.iter().map(|p| p.1));
    let sx = |x: f64| PAD + (x - x0) / (x1 - x0) * (W - PAD - 8.0);
    let sy = |y: f64| 8.0 + (1.0 - (y - y0) / (y1 - y0)) * (H - PAD - 8.0);
    let d: Vec<String> = curve
        .points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| format!("{}{:.1},{:.1}", if i == 0 { 'M' } else { 'L' }, sx(x), sy(y)))
        .collect();
    let _ = write!(out, "<path class=\"curve\" data-key=\"{}\" data-points=\"{}\" d=\"{}\"/>", curve.key, curve.points.len(), d.join(" "));
    for &(x, y) in &curve.points {
        let _ = write!(out, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.8\"><title>step {x}: {}</title></circle>", sx(x), sy(y), number(y));
    }
    let _ = write!(
        out,
        "<text x=\"{}\" y=\"14\" class=\"tick\">{}</text><text x=\"{}\" y=\"{}\" class=\"tick\">{}</text>",
        PAD - 4.0,
        number(y1),
        PAD - 4.0,
        H - PAD,
        number(y0)
    );
    let _ = write!(
        out,
        "<text x=\"{PAD}\" y=\"{}\" class=\"tick start\">step {x0}</text><text x=\"{}\" y=\"{}\" class=\"tick\">{x1}</text>",
        H - PAD + 16.0,
        W - 8.0,
        H - PAD + 16.0
    );
    out + "</svg></figure>\n"
}

/// (min, max), widened when they are equal.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5 - lo.abs() * 0.05, hi + 0.5 + hi.abs() * 0.05)
    }
}

/// Three significant digits, short enough for an axis label: 0.00213 -> 2.13e-3, 18068 -> 18.1k.
fn number(x: f64) -> String {
    let a = x.abs();
    if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else if a != 0.0 && a < 1e-2 {
        format!("{x:.2e}")
    } else {
        format!("{x:.3}")
    }
}

fn completion_section(eval: Option<&CompletionEval>) -> String {
    let Some(eval) = eval else {
        return "<h2>Completion</h2><p>No completion evaluation in this run (train with <code>--do_eval</code>, or run <code>worker eval</code>).</p>\n".into();
    };
    let models: Vec<(&str, &Scores)> = [(EvalModel::Base, "base"), (EvalModel::FineTuned, "fine-tuned")]
        .into_iter()
        .filter_map(|(model, label)| Some((label, eval.models.get(&model)?)))
        .collect();
    let mut out = format!(
        "<h2>Completion: next line on {} held-out positions</h2><table class=\"scores\"><tr><th></th>{}</tr>",
        eval.positions,
        models.iter().map(|(label, _)| format!("<th>{label}</th>")).collect::<String>()
    );
    type Score = fn(&Scores) -> f64;
    let rows: [(&str, usize, Score); 4] = [
        ("exact match %", 1, |s| s.exact_match),
        ("edit similarity", 1, |s| s.edit_similarity),
        ("held-out loss", 4, |s| s.loss),
        ("perplexity", 2, |s| s.perplexity),
    ];
    for (label, digits, score) in rows {
        let cells: String = models.iter().map(|(_, scores)| format!("<td>{:.*}</td>", digits, score(scores))).collect();
        let _ = write!(out, "<tr><th>{label}</th>{cells}</tr>");
    }
    out + "</table>\n"
}

/// Six positions spread evenly over the evaluated ones, each model's prediction beside the target.
fn examples_section(predictions: &[Prediction]) -> String {
    let fine: Vec<&Prediction> = predictions.iter().filter(|p| p.model == EvalModel::FineTuned).collect();
    if fine.is_empty() {
        return String::new();
    }
    let base = |p: &Prediction| predictions.iter().find(|b| b.model == EvalModel::Base && b.url == p.url && b.line == p.line);
    let picks: Vec<&Prediction> = (0..6.min(fine.len())).map(|i| fine[i * fine.len() / 6.min(fine.len())]).collect();
    let mut out = String::from("<h2>Examples</h2><div class=\"examples\">\n");
    for p in picks {
        let _ = write!(out, "<section><h3>{}:{}</h3><pre class=\"prompt\">{}</pre><dl>", escape(&p.url), p.line, escape(&p.prompt_tail));
        let _ = write!(out, "<dt>target</dt><dd><pre>{}</pre></dd>", escape(&p.target));
        if let Some(b) = base(p) {
            let _ = write!(out, "<dt>base ({:.0})</dt><dd><pre>{}</pre></dd>", b.edit_similarity, escape(&b.prediction));
        }
        let _ = writeln!(out, "<dt>fine-tuned ({:.0})</dt><dd><pre>{}</pre></dd></dl></section>", p.edit_similarity, escape(&p.prediction));
    }
    out + "</div>\n"
}

fn plan_section(run: Option<&RunRecord>) -> String {
    let Some(run) = run else { return String::new() };
    let config = &run.model_config;
    let zero = &run.zero_optimization;
    let global = run.per_device_train_batch_size * run.gradient_accumulation_steps * run.world_size;
    let precision = serde_json::to_value(run.precision).ok().and_then(|p| p.as_str().map(String::from)).unwrap_or_default();
    let rows = [
        (
            "model",
            match zerotune_hf::ModelConfig::from_value(config.clone()) {
                Ok(model) => format!("{} ({})", run.model_name_or_path, model.summary()),
                Err(_) => format!("{} ({} parameters)", run.model_name_or_path, run.num_parameters),
            },
        ),
        (
            "data",
            format!(
                "{}: {} train / {} validation blocks of {} tokens",
                run.train_file.display(),
                run.train_blocks,
                run.validation_blocks,
                run.block_size
            ),
        ),
        (
            "batch",
            format!(
                "micro {} x accumulation {} x world {} = {global} blocks per step, {} steps",
                run.per_device_train_batch_size, run.gradient_accumulation_steps, run.world_size, run.total_steps
            ),
        ),
        ("world", format!("{} rank(s) on {}, {precision}", run.world_size, run.device)),
        ("ZeRO", format!("stage {}, optimizer offload {}", zero.stage, zero.offload_optimizer)),
        ("learning rate", run.learning_rate.to_string()),
    ];
    let mut out = String::from("<h2>Plan</h2><table class=\"plan\">");
    for (label, value) in rows {
        let _ = write!(out, "<tr><th>{label}</th><td>{}</td></tr>", escape(&value));
    }
    out + "</table>\n"
}

/// Text safe inside HTML elements and attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1d2430;padding:0 1em}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #d8dde6}\
table{border-collapse:collapse}th,td{padding:.3em .9em;text-align:right;border-bottom:1px solid #e6e9ef}\
th:first-child{text-align:left}table.plan td{text-align:left}\
.curves{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-weight:600;margin-bottom:.2em}\
.frame{fill:#fafbfc;stroke:#c9d0db}.curve{fill:none;stroke:#2f6fdf;stroke-width:1.8}circle{fill:#2f6fdf}\
.tick{font-size:10px;fill:#5b6678;text-anchor:end}.tick.start{text-anchor:start}.none{fill:#8a94a6;text-anchor:middle}\
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:1em}\
section{border:1px solid #d8dde6;border-radius:6px;padding:.6em .8em}h3{font-size:.95em;margin:.1em 0 .4em}\
pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;font:12px/1.4 ui-monospace,monospace}pre.prompt{color:#5b6678;background:#f4f6f9;padding:.3em}\
dt{font-weight:600;margin-top:.4em}dd{margin:0 0 0 .8em}.foot{color:#8a94a6;margin-top:2em}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_from_partial_files_escapes_user_text() {
        let dir = tempfile::tempdir().unwrap();
        let records = [
            r#"{"step":1,"epoch":0.1,"loss":5.0,"learning_rate":0.001,"grad_norm":1.0,"tokens_per_second":10.0}"#,
            r#"{"step":2,"epoch":0.2,"loss":4.0,"learning_rate":0.002,"grad_norm":1.0,"tokens_per_second":12.0}"#,
            r#"{"step":2,"epoch":0.2,"eval_loss":4.5,"perplexity":90.0}"#,
            "{\"step\":3,\"lo",
        ];
        std::fs::write(dir.path().join(METRICS_FILE), records.join("\n")).unwrap();
        let prediction = r#"{"model":"fine_tuned","url":"a<b>.py","line":2,"prompt_tail":"if x < 1:","target":"    y = '&'","prediction":"</pre><script>","exact_match":0,"edit_similarity":10}"#;
        std::fs::write(dir.path().join(PREDICTIONS_FILE), prediction).unwrap();
        let html = std::fs::read_to_string(write(dir.path()).unwrap()).unwrap();
        assert!(html.contains("data-key=\"loss\" data-points=\"2\""), "the torn last line is skipped");
        assert!(html.contains("data-key=\"eval_loss\" data-points=\"1\""));
        assert!(!html.contains("<script") && html.contains("&lt;/pre&gt;&lt;script&gt;") && html.contains("a&lt;b&gt;.py"));
        assert!(html.contains("No completion evaluation"));
        assert_eq!(html.matches("http").count(), html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count(), "nothing is fetched");
        let empty = tempfile::tempdir().unwrap();
        assert!(write(empty.path()).unwrap_err().to_string().contains("not a run directory"));
    }
}
