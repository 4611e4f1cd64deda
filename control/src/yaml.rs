//! Bounded YAML input: every YAML file the project reads (`rama.yaml`,
//! `logging.yaml`, worker configurations) goes through [`parse`], which
//! refuses oversized text and deep nesting before the YAML parser sees it.
//!
//! Regression: a file nested 100,000 levels deep took the parser over 25 s
//! to refuse. The depth is counted in one linear pass: flow collections
//! (`[`, `{` outside quoted scalars and comments) and block nesting
//! (indentation levels, plus `- ` entries that open a sequence on the
//! same line).

use serde_yaml::Value as Yaml;

/// The deepest nesting accepted: the same figure as the engine's
/// `value::DEPTH_MAX` (a test in `net` checks they agree).
pub const DEPTH_MAX: usize = 128;
/// The largest YAML text accepted.
pub const TEXT_BYTES_MAX: usize = 1 << 20;

/// Parses `text`, refusing (before parsing) text above [`TEXT_BYTES_MAX`]
/// or nesting deeper than [`DEPTH_MAX`].
pub fn parse(text: &str) -> Result<Yaml, String> {
    if text.len() > TEXT_BYTES_MAX {
        return Err(format!(
            "the text is {} bytes, above the limit of {TEXT_BYTES_MAX} bytes",
            text.len()
        ));
    }
    let depth = nesting(text);
    if depth > DEPTH_MAX {
        return Err(format!("it nests deeper than {DEPTH_MAX} levels (at least {depth})"));
    }
    serde_yaml::from_str(text).map_err(|e| e.to_string())
}

/// An upper estimate of the nesting depth of `text` (it may count a
/// little more than the parser would: never less). Stops counting once
/// past [`DEPTH_MAX`].
fn nesting(text: &str) -> usize {
    let mut deepest = 0;
    // Indentation widths of the open block levels.
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for line in text.lines() {
        let body = line.trim_start_matches(' ');
        let indent = line.len() - body.len();
        if flow == 0 && !body.is_empty() && !body.starts_with('#') {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
            // `- - - x` opens a sequence per dash on one line.
            let mut rest = body;
            while let Some(r) = rest
                .strip_prefix("- ")
                .or_else(|| rest.strip_prefix('-').filter(|r| r.is_empty()))
            {
                indents.push(indent + 1);
                rest = r.trim_start_matches(' ');
            }
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in body.chars() {
            match (quote, c) {
                (Some('"'), '"') if prev != '\\' => quote = None,
                (Some('\''), '\'') => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') if matches!(prev, ' ' | '[' | '{' | ',' | ':') => quote = Some(c),
                (None, '#') if prev == ' ' => break,
                (None, '[' | '{') => flow += 1,
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
            deepest = deepest.max(indents.len() + flow);
            if deepest > DEPTH_MAX {
                return deepest;
            }
        }
        deepest = deepest.max(indents.len() + flow);
        if deepest > DEPTH_MAX {
            return deepest;
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_files_parse() {
        let text = "a: 1\nb:\n  c: [1, [2, 3], {d: 4}]\n  e:\n    - x\n    - - y\n      - z\n# [[[[ in a comment\nf: \"[[[[\"\n";
        let v = parse(text).unwrap();
        assert_eq!(v["a"], Yaml::from(1));
        assert!(nesting(text) < 10, "{}", nesting(text));
    }

    /// Regression: 100,000 levels took over 25 s to be refused.
    #[test]
    fn deep_nesting_is_refused_at_once() {
        for text in [
            format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!("a: {}1", "{b: ".repeat(100_000)),
            (0..200)
                .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
                .collect::<String>(),
            format!("{}x\n", "- ".repeat(200)),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.contains("nests deeper than 128"), "{e}");
        }
        let e = parse(&"a".repeat(TEXT_BYTES_MAX + 1)).unwrap_err();
        assert!(e.contains("above the limit"), "{e}");
        // At the limit it parses.
        let ok = format!("a: {}1{}", "[".repeat(DEPTH_MAX - 1), "]".repeat(DEPTH_MAX - 1));
        assert!(parse(&ok).is_ok());
    }
}
