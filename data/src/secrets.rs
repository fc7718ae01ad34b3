//! Secret detection and redaction, with the rule set written as plain data in the style of
//! gitleaks (`config/gitleaks.toml`): each rule has a name, lower-case keywords of which one must
//! occur (one aho-corasick pass over the text picks the rules worth running), a regex whose first
//! participating capture group is the secret's value, and an entropy floor for that value.
//! A finding carries the rule and the line, never the value; `redact` replaces only the value
//! with `<SECRET:rule>`, so the code keeps its shape.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder};
use regex::Regex;

/// How a rule's value is judged after its regex matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A fixed-format token: the regex and the entropy floor say it all.
    Token,
    /// `name = value`: the value must also not be code (`os.environ[...]`, `str`) or a
    /// placeholder (`${X}`, `<token>`, `xxxx`), and must mix letters and digits.
    Assignment,
    /// The password of `scheme://user:pass@host`: not a placeholder (`${PASS}`, `password`).
    UrlPassword,
}

/// One detection rule.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The name in findings, the report and the placeholder `<SECRET:name>`.
    pub name: &'static str,
    /// What it finds, for people (README, the report).
    pub what: &'static str,
    /// Lower-case substrings; the regex runs only on texts holding one of them.
    pub keywords: &'static [&'static str],
    /// The pattern; its first capture group that took part in the match is the secret value.
    pub regex: &'static str,
    /// Minimum Shannon entropy of the value, in bits per byte.
    pub min_entropy: f64,
    pub check: Check,
}

/// The rules, specific before generic: where two findings overlap, the earlier rule wins.
pub const RULES: &[Rule] = &[
    Rule {
        name: "private_key",
        what: "PEM / OpenSSH private key blocks (RSA, EC, DSA, OPENSSH, PGP, PKCS#8); the body is redacted",
        keywords: &["private key"],
        regex: r"-----BEGIN[ A-Z0-9_-]{0,30}PRIVATE KEY(?: BLOCK)?-----([\s\S]*?)-----END[ A-Z0-9_-]{0,30}PRIVATE KEY(?: BLOCK)?-----",
        min_entropy: 0.0,
        check: Check::Token,
    },
    Rule {
        name: "aws_access_key_id",
        what: "AWS access key ids (AKIA/ASIA/ABIA/ACCA + 16)",
        keywords: &["akia", "asia", "abia", "acca"],
        regex: r"\b((?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16})\b",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "aws_secret_access_key",
        what: "AWS secret access keys (40 base64 characters) assigned to an aws...secret...key name",
        keywords: &["secret"],
        regex: r#"(?i)aws[a-z0-9_.-]{0,20}secret[a-z0-9_.-]{0,20}["']?\s*(?::=|=>|=|:)\s*["']?([A-Za-z0-9/+]{40})\b"#,
        min_entropy: 3.5,
        check: Check::Token,
    },
    Rule {
        name: "gcp_service_account",
        what: "GCP service-account JSON: the private_key_id (its private_key is a private_key finding)",
        keywords: &["private_key_id"],
        regex: r#""private_key_id"\s*:\s*"([a-f0-9]{40})""#,
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "azure_connection_string",
        what: "Azure storage / service-bus connection strings: AccountKey= or SharedAccessKey=",
        keywords: &["accountkey", "sharedaccesskey"],
        regex: r"(?i)(?:AccountKey|SharedAccessKey)=([A-Za-z0-9+/]{40,100}={0,2})",
        min_entropy: 4.0,
        check: Check::Token,
    },
    Rule {
        name: "github_token",
        what: "GitHub tokens: ghp_/gho_/ghu_/ghs_/ghr_ + 36, github_pat_ + 82",
        keywords: &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
        regex: r"\b((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})\b",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "gitlab_token",
        what: "GitLab personal access tokens: glpat- + 20",
        keywords: &["glpat-"],
        regex: r"\b(glpat-[A-Za-z0-9_-]{20})\b",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "slack_token",
        what: "Slack tokens: xoxb-/xoxa-/xoxp-/xoxr-/xoxs-",
        keywords: &["xox"],
        regex: r"\b(xox[abprs]-[0-9A-Za-z-]{10,100})",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "slack_webhook",
        what: "Slack incoming-webhook URLs (hooks.slack.com/services/T../B../..)",
        keywords: &["hooks.slack.com"],
        regex: r"hooks\.slack\.com/services/(T[A-Z0-9]{6,}/B[A-Z0-9]{6,}/[A-Za-z0-9]{20,})",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "stripe_key",
        what: "Stripe secret and restricted keys: sk_live_, sk_test_, rk_live_, rk_test_",
        keywords: &["sk_live_", "sk_test_", "rk_live_", "rk_test_"],
        regex: r"\b((?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,99})\b",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "npm_token",
        what: "npm access tokens: npm_ + 36",
        keywords: &["npm_"],
        regex: r"\b(npm_[A-Za-z0-9]{36})\b",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "pypi_token",
        what: "PyPI upload tokens: pypi-AgEIcHlwaS5vcmc...",
        keywords: &["pypi-ageichlwas5vcmc"],
        regex: r"\b(pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,})",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "jwt",
        what: "JSON Web Tokens: eyJ<header>.eyJ<payload>.<signature>",
        keywords: &["eyj"],
        regex: r"\b(eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})",
        min_entropy: 3.0,
        check: Check::Token,
    },
    Rule {
        name: "url_credentials",
        what: "passwords in URLs: scheme://user:password@host",
        keywords: &["://"],
        regex: r#"(?i)\b[a-z][a-z0-9+.-]{1,20}://[^\s:@/'"<>]{0,64}:([^\s:@/'"<>]{3,128})@[a-z0-9.\[\]-]+"#,
        min_entropy: 0.0,
        check: Check::UrlPassword,
    },
    Rule {
        name: "generic_assignment",
        what: "password/secret/token/api_key/access_key/credential names assigned (= : => :=) a quoted value of 8+ or a bare value of 16+ characters that passes the entropy test and is not code or a placeholder",
        keywords: &["pass", "pwd", "secret", "token", "key", "credential"],
        regex: r#"(?i)\b[a-z0-9_.-]*(?:password|passwd|pwd|secret|token|api_?key|apikey|access_?key|auth_?key|credentials?)[a-z0-9_-]*["']?\s*(?::=|=>|==?|:)\s*(?:"([^"\s]{8,200})"|'([^'\s]{8,200})'|([A-Za-z0-9+/=_-]{16,200}))"#,
        min_entropy: 3.0,
        check: Check::Assignment,
    },
];

/// Where a rule matched: the value's byte span in the text and its 1-based line.
/// Deliberately without the value, so a finding can be printed, logged and stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub rule: &'static str,
    pub line: usize,
    start: usize,
    end: usize,
}

/// The rules compiled once, with the keyword prefilter.
pub struct Scanner {
    regexes: Vec<Regex>,
    keywords: AhoCorasick,
    /// The rule of each keyword pattern.
    keyword_rule: Vec<usize>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    pub fn new() -> Self {
        let regexes = RULES.iter().map(|r| Regex::new(r.regex).expect("the rule table's regexes compile")).collect();
        let (mut patterns, mut keyword_rule) = (vec![], vec![]);
        for (i, rule) in RULES.iter().enumerate() {
            for k in rule.keywords {
                patterns.push(*k);
                keyword_rule.push(i);
            }
        }
        let keywords = AhoCorasickBuilder::new().ascii_case_insensitive(true).build(&patterns).expect("keywords build");
        Self { regexes, keywords, keyword_rule }
    }

    /// The findings in `text`, in text order, overlaps resolved to the earlier rule.
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        let mut wanted = vec![false; RULES.len()];
        for m in self.keywords.find_overlapping_iter(text) {
            wanted[self.keyword_rule[m.pattern().as_usize()]] = true;
        }
        let mut spans: Vec<(usize, usize, usize)> = vec![]; // (start, rule, end)
        for (i, rule) in RULES.iter().enumerate().filter(|(i, _)| wanted[*i]) {
            for caps in self.regexes[i].captures_iter(text) {
                let Some(value) = caps.iter().skip(1).flatten().next() else { continue };
                if accepts(rule, value.as_str(), &text[value.end()..]) {
                    spans.push((value.start(), i, value.end()));
                }
            }
        }
        spans.sort_unstable();
        let mut kept: Vec<(usize, usize, usize)> = vec![];
        for span in spans {
            match kept.last_mut() {
                Some(last) if span.0 < last.2 => {
                    if span.1 < last.1 {
                        *last = span; // same region, the more specific rule
                    }
                }
                _ => kept.push(span),
            }
        }
        let (mut line, mut at) = (1, 0);
        kept.into_iter()
            .map(|(start, rule, end)| {
                line += text.as_bytes()[at..start].iter().filter(|&&b| b == b'\n').count();
                at = start;
                Finding { rule: RULES[rule].name, line, start, end }
            })
            .collect()
    }
}

/// `text` with each finding's value replaced by `<SECRET:rule>`; `findings` from `scan(text)`.
pub fn redact(text: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        out.push_str(&text[at..f.start]);
        out.push_str("<SECRET:");
        out.push_str(f.rule);
        out.push('>');
        at = f.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Shannon entropy of the bytes of `value`, in bits per byte.
pub fn entropy(value: &str) -> f64 {
    let mut counts = [0usize; 256];
    value.bytes().for_each(|b| counts[b as usize] += 1);
    let n = value.len() as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|p| -p * p.log2()).sum()
}

/// Whether a matched `value` (followed by `after`) is a secret under `rule`.
fn accepts(rule: &Rule, value: &str, after: &str) -> bool {
    if entropy(value) < rule.min_entropy {
        return false;
    }
    match rule.check {
        Check::Token => true,
        Check::UrlPassword => !placeholder(value),
        Check::Assignment => {
            // A bare value that goes on as an expression: `os.environ[...]`, `get_token()`.
            let code = after.starts_with(['.', '(', '[', '{', '<']);
            let mixed = value.bytes().any(|b| b.is_ascii_digit()) && value.bytes().any(|b| b.is_ascii_alphabetic());
            !code && mixed && !placeholder(value)
        }
    }
}

/// Template variables, documentation placeholders and masks rather than values.
fn placeholder(value: &str) -> bool {
    const WORDS: [&str; 12] =
        ["password", "passwd", "pass", "pwd", "secret", "token", "changeme", "example", "your", "dummy", "redacted", "xxxx"];
    let lower = value.to_ascii_lowercase();
    value.starts_with(['$', '{', '<', '%', '#', '*', '@'])
        || value.contains("${")
        || value.contains("{{")
        || value.contains("SECRET:")
        || WORDS.iter().any(|w| lower.contains(w))
        || value.bytes().all(|b| b == value.as_bytes()[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    // Canary values are assembled at run time, so this file itself holds no matchable secret
    // (the false-positive test scans this repository's source).
    fn alnum(n: usize, seed: u64) -> String {
        let chars = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n).map(|_| chars[rng.below(chars.len())] as char).collect()
    }
    fn upper(n: usize, seed: u64) -> String {
        alnum(n * 3, seed).chars().filter(|c| c.is_ascii_uppercase() || c.is_ascii_digit()).take(n).collect()
    }

    fn rules_of(text: &str) -> Vec<&'static str> {
        Scanner::new().scan(text).into_iter().map(|f| f.rule).collect()
    }

    /// Each rule on a line of its own: found, on its line, and gone after redaction.
    #[test]
    fn every_rule_finds_its_canary_and_redaction_removes_it() {
        let hexs: String = alnum(200, 9).chars().filter(|c| c.is_ascii_hexdigit()).map(|c| c.to_ascii_lowercase()).take(40).collect();
        let cases: Vec<(&str, String, String)> = vec![
            (
                "private_key",
                format!("{}{}", "-----BEGIN RSA PRIVATE", " KEY-----\n"),
                format!("{}\n{}\n-----END RSA PRIVATE KEY-----", alnum(64, 1), alnum(64, 2)),
            ),
            ("aws_access_key_id", "key_id = ".into(), ["AK", "IA", &upper(16, 3)].concat()),
            ("aws_secret_access_key", format!("{}_secret_access_key = ", "aws"), format!("{}/{}", alnum(20, 4), alnum(19, 5))),
            ("gcp_service_account", format!("\"{}_id\": \"", "private_key"), format!("{hexs}\"")),
            (
                "azure_connection_string",
                format!("DefaultEndpointsProtocol=https;AccountName=x;{}=", "AccountKey"),
                format!("{}==", alnum(86, 6)),
            ),
            ("github_token", "tok = ".into(), format!("{}_{}", "ghp", alnum(36, 7))),
            ("gitlab_token", "tok = ".into(), format!("{}-{}", "glpat", alnum(20, 8))),
            ("slack_token", "tok = ".into(), format!("{}-{}-{}", "xoxb", 1234567890, alnum(24, 10))),
            (
                "slack_webhook",
                format!("url = https://hooks.{}/services/", "slack.com"),
                format!("T{}/B{}/{}", upper(8, 11), upper(8, 12), alnum(24, 13)),
            ),
            ("stripe_key", "k = ".into(), format!("{}_live_{}", "sk", alnum(24, 14))),
            ("npm_token", "//registry.npmjs.org/:_authToken=".into(), format!("{}_{}", "npm", alnum(36, 15))),
            ("pypi_token", "password = ".into(), format!("{}-{}{}", "pypi", "AgEIcHlwaS5vcmc", alnum(60, 16))),
            ("jwt", "auth = ".into(), ["ey", "J", &alnum(20, 17), ".ey", "J", &alnum(30, 18), ".", &alnum(30, 19)].concat()),
            ("url_credentials", "db = postgres://admin:".into(), format!("{}@db.internal:5432/app", alnum(12, 20))),
            ("generic_assignment", "db_password = \"".into(), format!("{}\"", alnum(14, 21))),
        ];
        let scanner = Scanner::new();
        for (rule, before, value) in cases {
            let text = format!("first line\n{before}{value}\nlast line\n");
            let found = scanner.scan(&text);
            assert_eq!(found.iter().map(|f| f.rule).collect::<Vec<_>>(), [rule], "rule {rule}");
            assert_eq!(found[0].line, 2, "rule {rule}");
            let redacted = redact(&text, &found);
            let secret = value.trim_end_matches('"').split('@').next().unwrap().split("\n-----END").next().unwrap();
            assert!(!redacted.contains(secret), "rule {rule}: the value survived redaction");
            assert!(redacted.contains(&format!("<SECRET:{rule}>")), "rule {rule}");
            assert!(redacted.starts_with("first line\n") && redacted.ends_with("\nlast line\n"), "rule {rule}: shape kept");
        }
    }

    #[test]
    fn redaction_keeps_the_code_around_the_value() {
        let text = format!("API_KEY = \"{}\"  # prod\n", alnum(20, 30));
        let found = Scanner::new().scan(&text);
        assert_eq!(redact(&text, &found), "API_KEY = \"<SECRET:generic_assignment>\"  # prod\n");
        let url = format!("conn = \"mysql://app:{}@10.0.0.5/db\"\n", alnum(10, 31));
        assert_eq!(redact(&url, &Scanner::new().scan(&url)), "conn = \"mysql://app:<SECRET:url_credentials>@10.0.0.5/db\"\n");
    }

    #[test]
    fn ordinary_code_is_not_a_secret() {
        let quiet = [
            "password = os.environ[\"DB_PASSWORD\"]",
            "token: str",
            "def login(password: str, token: Optional[str] = None):",
            "secret = get_secret(name)",
            "api_key = config.api_key",
            "let token = tokens[i];",
            "max_tokens = 4096",
            "PASSWORD=${DB_PASSWORD}",
            "password: \"{{ vault_password }}\"",
            "password = \"********\"",
            "token = \"<your token here>\"",
            "url = \"postgres://user:password@localhost/db\"",
            "url = \"https://user:$PASS@example.com\"",
            "checksum = \"3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855e\"",
            "id = \"550e8400-e29b-41d4-a716-446655440000\"",
            "data = \"SGVsbG8sIFdvcmxkISBUaGlzIGlzIGJhc2U2NCB0ZXN0IGRhdGEu\"",
            "eos_token_id = 50256",
            "\"integrity\": \"sha512-Yfrqw1k7eq3jgIb3nZq9Am/Zd04v3RRF3NGGWs9l4wFGq8bLSlSwx7JRmw==\"",
            "https://github.com/user/repo.git",
            "secret_key_base = Rails.application.credentials.secret_key_base",
        ];
        for line in quiet {
            assert_eq!(rules_of(line), Vec::<&str>::new(), "{line}");
        }
    }

    #[test]
    fn the_prefilter_skips_rules_without_their_keyword_and_is_case_insensitive() {
        let text = format!("TOKEN = '{}'\n", alnum(16, 40));
        assert_eq!(rules_of(&text), ["generic_assignment"]);
        assert!(rules_of(&alnum(5000, 41)).is_empty());
    }

    #[test]
    fn entropy_and_overlap() {
        assert_eq!(entropy("aaaa"), 0.0);
        assert!((entropy("abcd") - 2.0).abs() < 1e-12);
        // A GitHub token assigned to `token`: one finding, the specific rule.
        let text = format!("token = \"{}_{}\"\n", "ghp", alnum(36, 50));
        assert_eq!(rules_of(&text), ["github_token"]);
        // Low-entropy look-alikes are placeholders, not keys.
        assert!(rules_of(&format!("k = {}{}", "AKIA", "X".repeat(16))).is_empty());
    }

    #[test]
    fn line_numbers_count_from_one_in_text_order() {
        let stripe = ["sk", "_live_", &alnum(24, 61)].concat();
        let text = format!("a\n{}_{}\nb\n\nc = \"{stripe}\"\n", "ghp", alnum(36, 60));
        let found = Scanner::new().scan(&text);
        assert_eq!(found.iter().map(|f| (f.rule, f.line)).collect::<Vec<_>>(), [("github_token", 2), ("stripe_key", 5)]);
    }
}
