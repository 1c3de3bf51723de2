//! Log lines on stderr, as human text or as one JSON object per line, each carrying the run id.
//!
//! The run id is added by the line formatter, not by a span: the pipeline's work runs on tokio
//! tasks and threads (the submission workers, the listener, the state writer, the Parquet encoders)
//! that a span entered on the main thread does not reach, and every line must name its run.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, format};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber: `level` and above to stderr, as JSON lines when `json`, each line
/// with `run_id`.
pub fn init(level: tracing::Level, json: bool, run_id: String) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr);
    if json {
        let inner = format()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false);
        builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(WithRunId::json(inner, run_id))
            .init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let inner = format().with_target(false).with_ansi(ansi);
        builder
            .with_ansi(ansi)
            .event_format(WithRunId::text(inner, run_id))
            .init();
    }
}

/// Wraps a line formatter and adds the run id to every line: as the first key of a JSON object, or
/// as a trailing `run_id=...` field of a text line.
#[derive(Debug)]
pub struct WithRunId<F> {
    inner: F,
    /// `"run_id":"<id>",` (JSON) or ` run_id=<id>` (text).
    field: String,
    json: bool,
}

impl<F> WithRunId<F> {
    pub fn json(inner: F, run_id: String) -> Self {
        let id = serde_json::to_string(&run_id).unwrap_or_else(|_| "\"\"".into());
        WithRunId {
            inner,
            field: format!("\"run_id\":{id},"),
            json: true,
        }
    }

    pub fn text(inner: F, run_id: String) -> Self {
        WithRunId {
            inner,
            field: format!(" run_id={run_id}"),
            json: false,
        }
    }

    /// `line` (one formatted event, ending in a newline) with the run id added.
    fn add_to(&self, line: &str) -> String {
        let mut out = String::with_capacity(line.len() + self.field.len());
        if self.json {
            match line.strip_prefix('{') {
                Some(rest) => {
                    out.push('{');
                    out.push_str(&self.field);
                    out.push_str(rest);
                }
                None => out.push_str(line),
            }
        } else {
            let body = line.strip_suffix('\n').unwrap_or(line);
            out.push_str(body);
            out.push_str(&self.field);
            out.push('\n');
        }
        out
    }
}

impl<S, N, F> FormatEvent<S, N> for WithRunId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&self.add_to(&line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_id_leads_a_json_line_and_ends_a_text_line() {
        let json = WithRunId::json((), "r-1".into());
        assert_eq!(
            json.add_to("{\"level\":\"INFO\",\"message\":\"hi\"}\n"),
            "{\"run_id\":\"r-1\",\"level\":\"INFO\",\"message\":\"hi\"}\n"
        );
        let text = WithRunId::text((), "r-1".into());
        assert_eq!(
            text.add_to("2026-01-01T00:00:00Z  INFO hi jobs=3\n"),
            "2026-01-01T00:00:00Z  INFO hi jobs=3 run_id=r-1\n"
        );
    }
}
