//! Which ranks run where, the DeepSpeed way: a hostfile (`host slots=N` per line), narrowed by
//! `--include` / `--exclude` (`host1:0,2@host2`), `--num_nodes` and `--num_gpus`. Global ranks are
//! node-major in hostfile order (a Slurm allocation's ranks are `slurm.rs`). Pure functions over
//! text, so every rule is unit-tested.

use std::path::Path;

use crate::error::{CoordinatorError, Result};

/// One machine and the slots (GPU indices, or CPU rank indices) used on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub host: String,
    pub slots: Vec<usize>,
}

/// Every rank's place: (global rank, host, local rank, slot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub host: String,
    pub local_rank: usize,
    pub slot: usize,
}

/// Parses hostfile text (`path` names it in errors): `host slots=N`, `#` comments, blank lines.
pub fn parse_hostfile(text: &str, path: &Path) -> Result<Vec<Node>> {
    let mut nodes: Vec<Node> = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |message: String| CoordinatorError::Line { path: path.into(), line: i + 1, message };
        let mut words = line.split_whitespace();
        let host = words.next().expect("non-empty line").to_string();
        let slots = match (words.next().and_then(|w| w.strip_prefix("slots=")), words.next()) {
            (Some(n), None) => n.parse::<usize>().ok().filter(|&n| n > 0),
            _ => None,
        }
        .ok_or_else(|| at(format!("expected \"hostname slots=N\" (N >= 1), found {line:?}")))?;
        if nodes.iter().any(|n| n.host == host) {
            return Err(at(format!("host {host} is listed twice")));
        }
        nodes.push(Node { host, slots: (0..slots).collect() });
    }
    if nodes.is_empty() {
        return Err(CoordinatorError::Data { path: path.into(), message: "no hosts (expected lines like \"worker-0 slots=8\")".into() });
    }
    Ok(nodes)
}

/// `host1:0,2@host2` -> [(host1, Some([0, 2])), (host2, None)].
fn parse_filter(spec: &str, flag: &'static str) -> Result<Vec<(String, Option<Vec<usize>>)>> {
    spec.split('@')
        .map(|part| {
            let (host, slots) = match part.split_once(':') {
                Some((host, list)) => {
                    let slots = list
                        .split(',')
                        .map(|s| s.trim().parse::<usize>())
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|_| CoordinatorError::flag(flag, format!("{spec:?}"), "slots must be numbers, as in host:0,1"))?;
                    (host, Some(slots))
                }
                None => (part, None),
            };
            if host.trim().is_empty() {
                return Err(CoordinatorError::flag(flag, format!("{spec:?}"), "empty host name (use host1:0,1@host2)"));
            }
            Ok((host.trim().to_string(), slots))
        })
        .collect()
}

/// What the launch flags ask for.
#[derive(Clone, Debug, Default)]
pub struct Selection<'a> {
    pub include: Option<&'a str>,
    pub exclude: Option<&'a str>,
    pub num_nodes: Option<usize>,
    pub num_gpus: Option<usize>,
}

/// Applies DeepSpeed's rules to the hostfile's nodes.
pub fn select(nodes: Vec<Node>, s: &Selection) -> Result<Vec<Node>> {
    if s.include.is_some() && s.exclude.is_some() {
        return Err(CoordinatorError::flags(&["--include", "--exclude"], "--include and --exclude are mutually exclusive"));
    }
    if (s.include.is_some() || s.exclude.is_some()) && (s.num_nodes.is_some() || s.num_gpus.is_some()) {
        let message = "--num_nodes / --num_gpus cannot be combined with --include / --exclude (as in deepspeed)";
        return Err(CoordinatorError::flags(&["--num_nodes", "--num_gpus", "--include", "--exclude"], message));
    }
    let mut selected = match (s.include, s.exclude) {
        (Some(spec), _) => include(&nodes, spec)?,
        (None, Some(spec)) => exclude(nodes, spec)?,
        (None, None) => nodes,
    };
    if let Some(n) = s.num_nodes {
        if n == 0 || n > selected.len() {
            return Err(CoordinatorError::flag("--num_nodes", n, format!("the hostfile has {} host(s)", selected.len())));
        }
        selected.truncate(n);
    }
    if let Some(g) = s.num_gpus {
        for node in &mut selected {
            if g == 0 || g > node.slots.len() {
                return Err(CoordinatorError::flag("--num_gpus", g, format!("{} has {} slot(s)", node.host, node.slots.len())));
            }
            node.slots.truncate(g);
        }
    }
    if selected.is_empty() {
        return Err(CoordinatorError::flags(&["--include", "--exclude"], "no slots left after --include / --exclude"));
    }
    Ok(selected)
}

/// `--include`: only the hosts (and slots) it names, in hostfile order so that ranks stay
/// node-major in that order.
fn include(nodes: &[Node], spec: &str) -> Result<Vec<Node>> {
    let mut out = vec![];
    for (host, slots) in parse_filter(spec, "--include")? {
        let node = known_node(nodes, &host, "--include")?;
        if let Some(slots) = &slots {
            check_slots(node, slots, "--include")?;
        }
        out.push(Node { slots: slots.unwrap_or_else(|| node.slots.clone()), host });
    }
    out.sort_by_key(|n| nodes.iter().position(|m| m.host == n.host));
    Ok(out)
}

/// `--exclude`: every host but those it names whole, and without the slots it names.
fn exclude(mut nodes: Vec<Node>, spec: &str) -> Result<Vec<Node>> {
    for (host, slots) in parse_filter(spec, "--exclude")? {
        known_node(&nodes, &host, "--exclude")?;
        let node = nodes.iter_mut().find(|n| n.host == host).expect("known");
        match slots {
            Some(slots) => {
                check_slots(node, &slots, "--exclude")?;
                node.slots.retain(|x| !slots.contains(x));
            }
            None => node.slots.clear(),
        }
    }
    nodes.retain(|n| !n.slots.is_empty());
    Ok(nodes)
}

/// The hostfile's node `host`, refused under `flag` when there is none.
fn known_node<'n>(nodes: &'n [Node], host: &str, flag: &'static str) -> Result<&'n Node> {
    nodes.iter().find(|n| n.host == host).ok_or_else(|| CoordinatorError::flag(flag, "", format!("host {host} is not in the hostfile")))
}

/// Refuses, under `flag`, a slot that `node` does not have.
fn check_slots(node: &Node, slots: &[usize], flag: &'static str) -> Result<()> {
    match slots.iter().find(|s| !node.slots.contains(s)) {
        Some(s) => {
            Err(CoordinatorError::flag(flag, "", format!("{}:{s} is not a slot of {} (it has {})", node.host, node.host, node.slots.len())))
        }
        None => Ok(()),
    }
}

/// Global ranks, node-major.
pub fn placements(nodes: &[Node]) -> Vec<Placement> {
    let mut rank = 0;
    let mut out = vec![];
    for node in nodes {
        for (local_rank, &slot) in node.slots.iter().enumerate() {
            out.push(Placement { rank, host: node.host.clone(), local_rank, slot });
            rank += 1;
        }
    }
    out
}

/// `KEY=VALUE` lines of a `.deepspeed_env` file (comments and blank lines skipped).
pub fn parse_env_file(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut vars = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) =
            line.split_once('=').filter(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).ok_or_else(
                || CoordinatorError::Line { path: path.into(), line: i + 1, message: format!("expected KEY=VALUE, found {line:?}") },
            )?;
        vars.push((key.to_string(), value.to_string()));
    }
    Ok(vars)
}

/// Hosts that name this machine (launched without ssh).
pub fn is_local(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<Node> {
        parse_hostfile("# cluster\nworker-0 slots=4\n\nworker-1 slots=2  # two GPUs\n", Path::new("hf")).unwrap()
    }

    fn sel<'a>(include: Option<&'a str>, exclude: Option<&'a str>, num_nodes: Option<usize>, num_gpus: Option<usize>) -> Selection<'a> {
        Selection { include, exclude, num_nodes, num_gpus }
    }

    #[test]
    fn hostfile_lines_and_errors() {
        assert_eq!(
            nodes(),
            [Node { host: "worker-0".into(), slots: vec![0, 1, 2, 3] }, Node { host: "worker-1".into(), slots: vec![0, 1] }]
        );
        for (text, needle) in [
            ("a slots=2\nb slot=2\n", "hf:2: expected \"hostname slots=N\""),
            ("a slots=0\n", "hf:1"),
            ("a slots=2\na slots=1\n", "hf:2: host a is listed twice"),
            ("# nothing\n", "no hosts"),
        ] {
            let err = parse_hostfile(text, Path::new("hf")).unwrap_err();
            assert!(matches!(err, CoordinatorError::Line { .. } | CoordinatorError::Data { .. }), "{err:?}");
            assert!(err.to_string().contains(needle), "{text:?}: {err}");
        }
        let err = parse_hostfile("a slots=2\nb slot=2\n", Path::new("hf")).unwrap_err();
        assert!(matches!(err, CoordinatorError::Line { line: 2, .. }), "{err:?}");
    }

    #[test]
    fn include_exclude_num_nodes_num_gpus() {
        let pick = |s: Selection| select(nodes(), &s).unwrap();
        assert_eq!(
            pick(sel(Some("worker-1:1@worker-0:0,2"), None, None, None)),
            [Node { host: "worker-0".into(), slots: vec![0, 2] }, Node { host: "worker-1".into(), slots: vec![1] },]
        );
        assert_eq!(pick(sel(None, Some("worker-0:1,3@worker-1"), None, None)), [Node { host: "worker-0".into(), slots: vec![0, 2] }]);
        assert_eq!(pick(sel(None, None, Some(1), Some(2))), [Node { host: "worker-0".into(), slots: vec![0, 1] }]);
        assert_eq!(pick(sel(Some("worker-1"), None, None, None)), [Node { host: "worker-1".into(), slots: vec![0, 1] }]);
        let ranks = placements(&pick(sel(None, None, None, None)));
        assert_eq!(ranks.len(), 6);
        assert_eq!(ranks[4], Placement { rank: 4, host: "worker-1".into(), local_rank: 0, slot: 0 });
    }

    #[test]
    fn conflicting_or_unknown_selections_are_refused() {
        for (s, needle) in [
            (sel(Some("worker-0"), Some("worker-1"), None, None), "mutually exclusive"),
            (sel(Some("worker-0"), None, Some(1), None), "cannot be combined"),
            (sel(Some("worker-9"), None, None, None), "host worker-9 is not in the hostfile"),
            (sel(Some("worker-1:5"), None, None, None), "worker-1:5 is not a slot"),
            (sel(Some("worker-1:x"), None, None, None), "slots must be numbers"),
            (sel(None, Some("worker-0@worker-1"), None, None), "no slots left"),
            (sel(None, None, Some(3), None), "--num_nodes 3: the hostfile has 2"),
            (sel(None, None, None, Some(3)), "--num_gpus 3: worker-1 has 2"),
        ] {
            let err = select(nodes(), &s).unwrap_err();
            assert!(matches!(err, CoordinatorError::Flag { .. } | CoordinatorError::Flags { .. }), "{err:?}");
            assert!(err.to_string().contains(needle), "{s:?}: {err}");
        }
        let err = select(nodes(), &sel(None, None, Some(3), None)).unwrap_err();
        assert!(matches!(&err, CoordinatorError::Flag { flag: "--num_nodes", value, .. } if value == "3"), "{err:?}");
    }

    #[test]
    fn deepspeed_env_lines() {
        let vars = parse_env_file("# env\nNCCL_IB_DISABLE=1\n\nPATH_EXTRA=/opt/x=y\n", Path::new(".deepspeed_env")).unwrap();
        assert_eq!(vars, [("NCCL_IB_DISABLE".into(), "1".into()), ("PATH_EXTRA".into(), "/opt/x=y".into())]);
        let err = parse_env_file("JUST_A_WORD\n", Path::new(".deepspeed_env")).unwrap_err().to_string();
        assert!(err.contains(".deepspeed_env:1: expected KEY=VALUE"), "{err}");
    }
}
