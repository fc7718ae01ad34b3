//! What a Slurm allocation holds, from its environment: the ranks per node (`SLURM_TASKS_PER_NODE`
//! in Slurm's compressed form `2(x3),1`, `SLURM_NTASKS_PER_NODE`, `SLURM_NTASKS`) and where that
//! number came from, with any launch flag that disagrees refused, naming both. Pure functions over
//! a variable lookup, so every rule is unit-tested.

use std::fmt;

use crate::error::{CoordinatorError, Result};
use crate::hosts::{placements, Node, Placement};

/// The ranks a Slurm allocation holds, and where their number came from (for the plan line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlurmAllocation {
    /// Node-major, as srun's block distribution numbers tasks; hosts are named by node index
    /// (srun places them). Nodes may hold different numbers of tasks.
    pub placements: Vec<Placement>,
    /// Where the world size came from, e.g. `SLURM_TASKS_PER_NODE=2(x3),1` or
    /// `--num_gpus 4 per node x SLURM_JOB_NUM_NODES=2 (the allocation names no task count)`.
    pub world_from: String,
}

/// The launch flags that size the ranks; under Slurm they must agree with the allocation.
#[derive(Clone, Copy, Debug, Default)]
pub struct SlurmFlags {
    pub num_nodes: Option<usize>,
    pub num_gpus: Option<usize>,
    pub num_workers: Option<usize>,
}

impl SlurmFlags {
    /// The flag that asks for ranks per node, by name, and its value.
    fn per_node(&self) -> Option<(&'static str, usize)> {
        match (self.num_gpus, self.num_workers) {
            (Some(n), _) => Some(("--num_gpus", n)),
            (None, Some(n)) => Some(("--num_workers", n)),
            (None, None) => None,
        }
    }
}

/// The allocation's `var` (`NAME=value`, or what the count came from) is wrong, or disagrees.
fn bad(var: impl fmt::Display, message: String) -> CoordinatorError {
    CoordinatorError::Slurm { var: var.to_string(), message }
}

/// One set, non-empty variable of the allocation; shown as `NAME=value`.
#[derive(Clone, Debug)]
struct Var {
    key: &'static str,
    value: String,
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

impl Var {
    fn count(&self) -> Result<usize> {
        self.value.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| bad(self, format!("{self}: expected a number of at least 1")))
    }

    fn counts(&self) -> Result<Vec<usize>> {
        expand_counts(&self.value).ok_or_else(|| bad(self, format!("{self}: expected counts like 2(x3),1")))
    }
}

/// The allocation's nodes: how many, and where that came from (said in messages).
struct Nodes {
    count: usize,
    said: String,
}

impl Nodes {
    /// `counts` given once for every node, or node by node.
    fn spread(&self, counts: Vec<usize>, var: &Var) -> Result<Vec<usize>> {
        match counts.len() {
            1 => Ok(vec![counts[0]; self.count]),
            n if n == self.count => Ok(counts),
            n => Err(bad(var, format!("{var} names {n} node(s) but the allocation has {} ({})", self.count, self.said))),
        }
    }
}

/// Slurm's compressed counts: `2(x3),1` -> [2, 2, 2, 1]; None unless every count is at least 1.
fn expand_counts(value: &str) -> Option<Vec<usize>> {
    let mut out = vec![];
    for part in value.split(',') {
        let (count, times) = match part.trim().split_once("(x") {
            Some((count, times)) => (count, times.strip_suffix(')')?.parse::<usize>().ok().filter(|&t| t > 0)?),
            None => (part.trim(), 1),
        };
        let count = count.parse::<usize>().ok().filter(|&c| c > 0)?;
        out.extend(std::iter::repeat_n(count, times));
    }
    Some(out)
}

/// [2, 2, 2, 1] -> "2(x3),1", as Slurm writes it.
fn compress_counts(counts: &[usize]) -> String {
    let mut parts: Vec<(usize, usize)> = vec![];
    for &c in counts {
        match parts.last_mut() {
            Some((last, times)) if *last == c => *times += 1,
            _ => parts.push((c, 1)),
        }
    }
    parts.iter().map(|&(c, t)| if t == 1 { c.to_string() } else { format!("{c}(x{t})") }).collect::<Vec<_>>().join(",")
}

/// The ranks of a Slurm allocation, from its environment (`lookup` reads a variable).
///
/// Nodes: SLURM_JOB_NUM_NODES (or SLURM_NNODES). Tasks per node, when the allocation was sized in
/// tasks (salloc/sbatch -n or --ntasks-per-node, which set SLURM_NTASKS or SLURM_NTASKS_PER_NODE):
/// SLURM_TASKS_PER_NODE (`2(x3),1` for uneven nodes), else SLURM_NTASKS_PER_NODE on every node,
/// else SLURM_NTASKS split evenly. Without a task count Slurm fills SLURM_TASKS_PER_NODE from the
/// CPUs (all of them with --exclusive), which is no rank count: then --num_gpus/--num_workers,
/// else SLURM_GPUS_ON_NODE, else one per node, each within SLURM_JOB_CPUS_PER_NODE. A flag that
/// disagrees with the allocation is refused, naming both.
pub fn slurm_allocation(lookup: &dyn Fn(&str) -> Option<String>, flags: &SlurmFlags) -> Result<SlurmAllocation> {
    if lookup("SLURM_JOB_ID").is_none() {
        return Err(bad("SLURM_JOB_ID", "--launcher slurm runs inside a Slurm allocation (salloc/sbatch): SLURM_JOB_ID is not set".into()));
    }
    let var = |key: &'static str| lookup(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).map(|value| Var { key, value });
    let tasks = Tasks {
        ntasks: var("SLURM_NTASKS").or_else(|| var("SLURM_NPROCS")),
        ntasks_per_node: var("SLURM_NTASKS_PER_NODE"),
        tasks_per_node: var("SLURM_TASKS_PER_NODE"),
    };
    let nodes = nodes(var("SLURM_JOB_NUM_NODES").or_else(|| var("SLURM_NNODES")), tasks.tasks_per_node.as_ref())?;
    if let Some(n) = flags.num_nodes.filter(|&n| n != nodes.count) {
        return Err(bad(&nodes.said, format!("--num_nodes {n} but the allocation has {} node(s) ({})", nodes.count, nodes.said)));
    }
    let (per_node, world_from) = if tasks.sized() {
        tasks.per_node(&nodes, flags.per_node())?
    } else {
        without_task_count(&nodes, flags.per_node(), var("SLURM_GPUS_ON_NODE"), var("SLURM_JOB_CPUS_PER_NODE"))?
    };
    let nodes: Vec<Node> =
        per_node.iter().enumerate().map(|(i, &c)| Node { host: format!("slurm-node-{i}"), slots: (0..c).collect() }).collect();
    Ok(SlurmAllocation { placements: placements(&nodes), world_from })
}

/// The node count: SLURM_JOB_NUM_NODES's, else as many as SLURM_TASKS_PER_NODE lists, else 1.
fn nodes(num_nodes: Option<Var>, tasks_per_node: Option<&Var>) -> Result<Nodes> {
    Ok(match (num_nodes, tasks_per_node) {
        (Some(v), _) => Nodes { count: v.count()?, said: v.to_string() },
        (None, Some(v)) => {
            let count = v.counts()?.len();
            Nodes { count, said: format!("{count} node(s): SLURM_JOB_NUM_NODES is not set") }
        }
        (None, None) => Nodes { count: 1, said: "1 node(s): SLURM_JOB_NUM_NODES is not set".into() },
    })
}

/// The task variables of an allocation sized in tasks.
struct Tasks {
    ntasks: Option<Var>,
    ntasks_per_node: Option<Var>,
    tasks_per_node: Option<Var>,
}

impl Tasks {
    /// salloc/sbatch -n or --ntasks-per-node was given: SLURM_TASKS_PER_NODE counts ranks.
    fn sized(&self) -> bool {
        self.ntasks.is_some() || self.ntasks_per_node.is_some()
    }

    /// Tasks on each node and where that came from, checked against SLURM_NTASKS and the flag.
    fn per_node(&self, nodes: &Nodes, flag: Option<(&str, usize)>) -> Result<(Vec<usize>, String)> {
        let (counts, from) = if let Some(v) = &self.tasks_per_node {
            let listed = v.counts()?;
            if listed.len() != nodes.count {
                return Err(bad(v, format!("{v} names {} node(s) but the allocation has {} ({})", listed.len(), nodes.count, nodes.said)));
            }
            (listed, v.to_string())
        } else if let Some(v) = &self.ntasks_per_node {
            let listed = v.counts()?;
            let from = if listed.len() == 1 { format!("{v} x {}", nodes.said) } else { v.to_string() };
            (nodes.spread(listed, v)?, from)
        } else {
            let v = self.ntasks.as_ref().expect("sized in tasks");
            let total = v.count()?;
            if total % nodes.count != 0 {
                let why = "and SLURM_TASKS_PER_NODE, which would say how, is not set";
                return Err(bad(v, format!("{v} does not split evenly over {}, {why}", nodes.said)));
            }
            (vec![total / nodes.count; nodes.count], format!("{v} / {}", nodes.said))
        };
        if let Some(v) = &self.ntasks {
            let (total, sum) = (v.count()?, counts.iter().sum::<usize>());
            if total != sum {
                return Err(bad(v, format!("{v} but {from} makes {sum} task(s)")));
            }
        }
        if let Some((flag, n)) = flag.filter(|&(_, n)| counts.iter().any(|&c| c != n)) {
            let has = match counts.iter().all(|&c| c == counts[0]) {
                true => format!("{} tasks per node", counts[0]),
                false => format!("uneven tasks per node ({})", compress_counts(&counts)),
            };
            return Err(bad(&from, format!("{flag} {n} but the allocation has {has} ({from})")));
        }
        Ok((counts, from))
    }
}

/// No task count: the ranks per node are the flag's, the GPUs' or one, within the node's CPUs.
fn without_task_count(nodes: &Nodes, flag: Option<(&str, usize)>, gpus: Option<Var>, cpus: Option<Var>) -> Result<(Vec<usize>, String)> {
    let gpus = gpus.map(|g| g.count().map(|n| (n, g.to_string()))).transpose()?;
    let (n, from) = match (flag, gpus) {
        (Some(("--num_gpus", n)), Some((g, gpus))) if g != n => {
            return Err(bad(&gpus, format!("--num_gpus {n} but the allocation has {g} GPU(s) per node ({gpus})")))
        }
        (Some((flag, n)), _) => (n, format!("{flag} {n} per node x {}", nodes.said)),
        (None, Some((g, gpus))) => (g, format!("{gpus} x {}", nodes.said)),
        (None, None) => (1, format!("one task per node x {}", nodes.said)),
    };
    let from = format!("{from} (the allocation names no task count)");
    if let Some(v) = cpus {
        if let Some(&fewest) = nodes.spread(v.counts()?, &v)?.iter().filter(|&&c| c < n).min() {
            let fix = format!("size the allocation in tasks, as in salloc --ntasks-per-node={n}");
            return Err(bad(&v, format!("{n} task(s) per node from {from}, but a node has {fewest} CPU(s) ({v}): {fix}")));
        }
    }
    Ok((vec![n; nodes.count], from))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Slurm environment: `SLURM_JOB_ID` and `vars`.
    fn slurm_env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = [("SLURM_JOB_ID", "7")].iter().chain(vars).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    fn flags(num_nodes: Option<usize>, num_gpus: Option<usize>, num_workers: Option<usize>) -> SlurmFlags {
        SlurmFlags { num_nodes, num_gpus, num_workers }
    }

    /// What a real one-node Slurm 22.05 sets (`salloc -N1 -n2 env`, `salloc -N1 --ntasks-per-node=2 env`).
    const SALLOC_N2: &[(&str, &str)] = &[
        ("SLURM_JOB_NUM_NODES", "1"),
        ("SLURM_NNODES", "1"),
        ("SLURM_JOB_CPUS_PER_NODE", "2"),
        ("SLURM_TASKS_PER_NODE", "2"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_NPROCS", "2"),
    ];
    const SALLOC_NTASKS_PER_NODE_2: &[(&str, &str)] = &[
        ("SLURM_NTASKS_PER_NODE", "2"),
        ("SLURM_JOB_NUM_NODES", "1"),
        ("SLURM_NNODES", "1"),
        ("SLURM_JOB_CPUS_PER_NODE", "2"),
        ("SLURM_TASKS_PER_NODE", "2"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_NPROCS", "2"),
    ];
    /// `salloc -N1 --exclusive` on a 2-CPU node: no task count, SLURM_TASKS_PER_NODE is the CPUs.
    const SALLOC_EXCLUSIVE: &[(&str, &str)] =
        &[("SLURM_JOB_NUM_NODES", "1"), ("SLURM_NNODES", "1"), ("SLURM_JOB_CPUS_PER_NODE", "2"), ("SLURM_TASKS_PER_NODE", "2")];

    #[test]
    fn slurm_counts_compressed_and_plain() {
        assert_eq!(expand_counts("2(x3),1"), Some(vec![2, 2, 2, 1]));
        assert_eq!(expand_counts("4"), Some(vec![4]));
        assert_eq!(expand_counts("1,3(x2)"), Some(vec![1, 3, 3]));
        for bad in ["", "0", "2(x0)", "2(x3", "x,1", "2(3)", "-1"] {
            assert_eq!(expand_counts(bad), None, "{bad:?}");
        }
        assert_eq!(compress_counts(&[2, 2, 2, 1]), "2(x3),1");
        assert_eq!(compress_counts(&[1, 3, 3]), "1,3(x2)");
    }

    #[test]
    fn slurm_tasks_size_the_job() {
        let world = |vars: &[(&str, &str)], f: SlurmFlags| slurm_allocation(&slurm_env(vars), &f).unwrap();
        // Issue 29: `salloc -N1 -n2` sets no SLURM_NTASKS_PER_NODE, yet holds two tasks.
        let a = world(SALLOC_N2, SlurmFlags::default());
        assert_eq!(a.placements.len(), 2);
        assert_eq!(a.placements[1], Placement { rank: 1, host: "slurm-node-0".into(), local_rank: 1, slot: 1 });
        assert_eq!(a.world_from, "SLURM_TASKS_PER_NODE=2");
        assert_eq!(world(SALLOC_NTASKS_PER_NODE_2, SlurmFlags::default()).placements.len(), 2);
        assert_eq!(world(SALLOC_N2, flags(Some(1), Some(2), None)).placements.len(), 2, "flags that agree pass");
        assert_eq!(world(SALLOC_N2, flags(None, None, Some(2))).placements.len(), 2);

        // Uneven nodes, node-major as srun's block distribution numbers them.
        let uneven = [("SLURM_JOB_NUM_NODES", "4"), ("SLURM_TASKS_PER_NODE", "2(x3),1"), ("SLURM_NTASKS", "7")];
        let a = world(&uneven, SlurmFlags::default());
        assert_eq!(a.placements.len(), 7);
        assert_eq!(a.placements[5], Placement { rank: 5, host: "slurm-node-2".into(), local_rank: 1, slot: 1 });
        assert_eq!(a.placements[6], Placement { rank: 6, host: "slurm-node-3".into(), local_rank: 0, slot: 0 });
        assert_eq!(a.world_from, "SLURM_TASKS_PER_NODE=2(x3),1");
        assert_eq!(world(&uneven[1..], SlurmFlags::default()).placements.len(), 7, "nodes from SLURM_TASKS_PER_NODE");
        let nnodes = [("SLURM_NNODES", "2"), ("SLURM_TASKS_PER_NODE", "1(x2)"), ("SLURM_NTASKS", "2")];
        assert_eq!(world(&nnodes, flags(Some(2), None, None)).placements.len(), 2, "SLURM_NNODES stands in");

        // Without SLURM_TASKS_PER_NODE: SLURM_NTASKS_PER_NODE on every node, else SLURM_NTASKS split.
        let a = world(&[("SLURM_JOB_NUM_NODES", "2"), ("SLURM_NTASKS_PER_NODE", "4(x2)")], SlurmFlags::default());
        assert_eq!(a.placements.len(), 8);
        assert_eq!(a.placements[5], Placement { rank: 5, host: "slurm-node-1".into(), local_rank: 1, slot: 1 });
        let a = world(&[("SLURM_JOB_NUM_NODES", "2"), ("SLURM_NTASKS_PER_NODE", "1")], SlurmFlags::default());
        assert_eq!((a.placements.len(), a.world_from.as_str()), (2, "SLURM_NTASKS_PER_NODE=1 x SLURM_JOB_NUM_NODES=2"));
        let a = world(&[("SLURM_JOB_NUM_NODES", "2"), ("SLURM_NTASKS", "4")], SlurmFlags::default());
        assert_eq!((a.placements.len(), a.world_from.as_str()), (4, "SLURM_NTASKS=4 / SLURM_JOB_NUM_NODES=2"));
        assert_eq!(a.placements[2].host, "slurm-node-1");
    }

    #[test]
    fn slurm_without_a_task_count() {
        let world = |vars: &[(&str, &str)], f: SlurmFlags| slurm_allocation(&slurm_env(vars), &f);
        // `salloc -N1 --exclusive`: SLURM_TASKS_PER_NODE counts CPUs, not ranks.
        let a = world(SALLOC_EXCLUSIVE, SlurmFlags::default()).unwrap();
        assert_eq!(a.placements.len(), 1);
        assert_eq!(a.world_from, "one task per node x SLURM_JOB_NUM_NODES=1 (the allocation names no task count)");
        let a = world(SALLOC_EXCLUSIVE, flags(None, None, Some(2))).unwrap();
        assert_eq!(a.placements.len(), 2);
        assert_eq!(a.world_from, "--num_workers 2 per node x SLURM_JOB_NUM_NODES=1 (the allocation names no task count)");
        let gpus = [("SLURM_JOB_NUM_NODES", "2"), ("SLURM_JOB_CPUS_PER_NODE", "8(x2)"), ("SLURM_GPUS_ON_NODE", "4")];
        let a = world(&gpus, SlurmFlags::default()).unwrap();
        assert_eq!(
            (a.placements.len(), a.world_from.as_str()),
            (8, "SLURM_GPUS_ON_NODE=4 x SLURM_JOB_NUM_NODES=2 (the allocation names no task count)")
        );
        assert_eq!(world(&gpus, flags(Some(2), Some(4), None)).unwrap().placements.len(), 8);
        assert_eq!(world(&[], SlurmFlags::default()).unwrap().placements.len(), 1, "no variables: one rank");

        for (vars, f, needle) in [
            (&gpus[..], flags(None, Some(2), None), "--num_gpus 2 but the allocation has 4 GPU(s) per node (SLURM_GPUS_ON_NODE=4)"),
            (SALLOC_EXCLUSIVE, flags(None, None, Some(3)), "3 task(s) per node from --num_workers 3 per node"),
            (SALLOC_EXCLUSIVE, flags(None, None, Some(3)), "a node has 2 CPU(s) (SLURM_JOB_CPUS_PER_NODE=2): size the allocation in tasks"),
            (
                &[("SLURM_JOB_NUM_NODES", "1"), ("SLURM_JOB_CPUS_PER_NODE", "1"), ("SLURM_GPUS_ON_NODE", "8")][..],
                SlurmFlags::default(),
                "8 task(s) per node from SLURM_GPUS_ON_NODE=8",
            ),
        ] {
            let err = world(vars, f).unwrap_err().to_string();
            assert!(err.contains(needle), "{vars:?} {f:?}: {err}");
        }
    }

    #[test]
    fn slurm_flags_that_disagree_are_refused() {
        let uneven: &[(&str, &str)] = &[("SLURM_JOB_NUM_NODES", "4"), ("SLURM_TASKS_PER_NODE", "2(x3),1"), ("SLURM_NTASKS", "7")];
        for (vars, f, needle) in [
            (SALLOC_N2, flags(None, Some(4), None), "--num_gpus 4 but the allocation has 2 tasks per node (SLURM_TASKS_PER_NODE=2)"),
            (SALLOC_N2, flags(None, None, Some(1)), "--num_workers 1 but the allocation has 2 tasks per node (SLURM_TASKS_PER_NODE=2)"),
            (SALLOC_N2, flags(Some(2), None, None), "--num_nodes 2 but the allocation has 1 node(s) (SLURM_JOB_NUM_NODES=1)"),
            (SALLOC_EXCLUSIVE, flags(Some(2), None, None), "--num_nodes 2 but the allocation has 1 node(s)"),
            (
                uneven,
                flags(None, Some(2), None),
                "--num_gpus 2 but the allocation has uneven tasks per node (2(x3),1) (SLURM_TASKS_PER_NODE=2(x3),1)",
            ),
            (
                &[("SLURM_JOB_NUM_NODES", "2"), ("SLURM_NTASKS_PER_NODE", "1")][..],
                flags(None, None, Some(2)),
                "--num_workers 2 but the allocation has 1 tasks per node (SLURM_NTASKS_PER_NODE=1 x SLURM_JOB_NUM_NODES=2)",
            ),
        ] {
            let err = slurm_allocation(&slurm_env(vars), &f).unwrap_err().to_string();
            assert!(err.contains(needle), "{f:?}: {err}");
        }
    }

    #[test]
    fn slurm_environments_that_make_no_sense_are_refused() {
        for (vars, needle) in [
            (
                &[("SLURM_JOB_NUM_NODES", "3"), ("SLURM_TASKS_PER_NODE", "2(x2)"), ("SLURM_NTASKS", "4")][..],
                "SLURM_TASKS_PER_NODE=2(x2) names 2 node(s) but the allocation has 3 (SLURM_JOB_NUM_NODES=3)",
            ),
            (
                &[("SLURM_JOB_NUM_NODES", "2"), ("SLURM_TASKS_PER_NODE", "2(x2)"), ("SLURM_NTASKS", "3")],
                "SLURM_NTASKS=3 but SLURM_TASKS_PER_NODE=2(x2) makes 4 task(s)",
            ),
            (
                &[("SLURM_JOB_NUM_NODES", "2"), ("SLURM_TASKS_PER_NODE", "2(x"), ("SLURM_NTASKS", "4")],
                "SLURM_TASKS_PER_NODE=2(x: expected counts like 2(x3),1",
            ),
            (&[("SLURM_JOB_NUM_NODES", "two"), ("SLURM_NTASKS", "4")], "SLURM_JOB_NUM_NODES=two: expected a number of at least 1"),
            (&[("SLURM_JOB_NUM_NODES", "2"), ("SLURM_NTASKS", "3")], "SLURM_NTASKS=3 does not split evenly over SLURM_JOB_NUM_NODES=2"),
            (
                &[("SLURM_JOB_NUM_NODES", "3"), ("SLURM_NTASKS_PER_NODE", "2(x2)")],
                "SLURM_NTASKS_PER_NODE=2(x2) names 2 node(s) but the allocation has 3",
            ),
        ] {
            let err = slurm_allocation(&slurm_env(vars), &SlurmFlags::default()).unwrap_err();
            // The variable at fault is named first in each sentence.
            assert!(matches!(&err, CoordinatorError::Slurm { var, .. } if needle.starts_with(var.as_str())), "{err:?}");
            let err = err.to_string();
            assert!(err.contains(needle), "{vars:?}: {err}");
        }
        let err = slurm_allocation(&|_: &str| None, &SlurmFlags::default()).unwrap_err();
        assert!(matches!(&err, CoordinatorError::Slurm { var, .. } if var == "SLURM_JOB_ID"), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("SLURM_JOB_ID is not set"), "{err}");
    }
}
