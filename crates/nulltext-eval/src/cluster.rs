//! `--shard auto`: this process's shard from the environment a cluster scheduler gives the
//! tasks of an array job, so that one job file runs a dataset in N pieces. A retried task
//! gets the same index, and the batch resumes it.
//!
//! | scheduler | index | count |
//! |---|---|---|
//! | Slurm job array | (`SLURM_ARRAY_TASK_ID` − `_MIN`) / `_STEP` | `SLURM_ARRAY_TASK_COUNT` |
//! | Kubernetes Indexed Job | `JOB_COMPLETION_INDEX` | given (`--shard-count`, `NULLTEXT_SHARD_COUNT`) |
//! | AWS Batch array job | `AWS_BATCH_JOB_ARRAY_INDEX` | given (`--shard-count`, `NULLTEXT_SHARD_COUNT`) |
//! | torchrun / torch.distributed | `RANK` | `WORLD_SIZE` |

use nulltext::error::{invalid, Result};

use crate::batch::Shard;

/// The variable that gives the task count where the scheduler does not.
pub const COUNT_VAR: &str = "NULLTEXT_SHARD_COUNT";

/// Where a shard came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    Slurm,
    Kubernetes,
    AwsBatch,
    Torchrun,
}

impl Scheduler {
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Slurm => "Slurm job array",
            Scheduler::Kubernetes => "Kubernetes Indexed Job",
            Scheduler::AwsBatch => "AWS Batch array job",
            Scheduler::Torchrun => "torchrun",
        }
    }
}

/// This task's shard from the scheduler's variables (`var` reads one; pass
/// `|k| std::env::var(k).ok()`), with `count` from the command line where the scheduler
/// does not say how many tasks there are. The first scheduler whose variables are set wins,
/// in the table's order.
///
/// ```
/// use nulltext_eval::batch::Shard;
/// use nulltext_eval::cluster::{resolve, Scheduler};
/// // Task 5 of `sbatch --array=1-9:2` (tasks 1, 3, 5, 7, 9).
/// let env = |k: &str| match k {
///     "SLURM_ARRAY_TASK_ID" => Some("5".to_string()),
///     "SLURM_ARRAY_TASK_MIN" => Some("1".to_string()),
///     "SLURM_ARRAY_TASK_STEP" => Some("2".to_string()),
///     "SLURM_ARRAY_TASK_COUNT" => Some("5".to_string()),
///     _ => None,
/// };
/// let (shard, by) = resolve(env, None).unwrap();
/// assert_eq!((shard, by), (Shard { index: 2, count: 5 }, Scheduler::Slurm));
/// ```
pub fn resolve(
    var: impl Fn(&str) -> Option<String>,
    count: Option<usize>,
) -> Result<(Shard, Scheduler)> {
    let num = |name: &str| -> Result<Option<usize>> {
        match var(name) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| invalid(format!("{name}=`{v}`: expected a non-negative integer"))),
        }
    };
    let given = |scheduler: Scheduler| -> Result<usize> {
        match count {
            Some(n) => Ok(n),
            None => num(COUNT_VAR)?.ok_or_else(|| {
                invalid(format!(
                    "--shard auto in a {}: the number of tasks is not in its environment; give it with --shard-count N or {COUNT_VAR}=N",
                    scheduler.name()
                ))
            }),
        }
    };
    let shard = |index: usize, count: usize, scheduler: Scheduler| -> Result<(Shard, Scheduler)> {
        if count == 0 || index >= count {
            return Err(invalid(format!(
                "{}: task {index} of {count}: expected 0 ≤ index < count",
                scheduler.name()
            )));
        }
        Ok((Shard { index, count }, scheduler))
    };
    if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
        let s = Scheduler::Slurm;
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let n = match count {
            Some(n) => n,
            None => num("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                invalid("SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT")
            })?,
        };
        if id < min || (id - min) % step != 0 {
            return Err(invalid(format!(
                "Slurm array task {id} is not on the range {min}, {min}+{step}, …: use --array=A-B[:STEP] (not a list)"
            )));
        }
        return shard((id - min) / step, n, s);
    }
    if let Some(i) = num("JOB_COMPLETION_INDEX")? {
        let s = Scheduler::Kubernetes;
        return shard(i, given(s)?, s);
    }
    if let Some(i) = num("AWS_BATCH_JOB_ARRAY_INDEX")? {
        let s = Scheduler::AwsBatch;
        return shard(i, given(s)?, s);
    }
    if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
        return shard(rank, count.unwrap_or(world), Scheduler::Torchrun);
    }
    Err(invalid(format!(
        "--shard auto: no scheduler's task index in the environment (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX, RANK with WORLD_SIZE); give --shard I/N{}",
        if count.is_some() { "" } else { " instead" }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn each_scheduler_gives_its_shard() {
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
        ];
        let (s, by) = resolve(env(&slurm), None).unwrap();
        assert_eq!((s, by), (Shard { index: 2, count: 4 }, Scheduler::Slurm));
        let k8s = [("JOB_COMPLETION_INDEX", "5"), (COUNT_VAR, "8")];
        assert_eq!(
            resolve(env(&k8s), None).unwrap(),
            (Shard { index: 5, count: 8 }, Scheduler::Kubernetes)
        );
        assert_eq!(resolve(env(&k8s), Some(6)).unwrap().0.count, 6);
        let aws = [("AWS_BATCH_JOB_ARRAY_INDEX", "1")];
        assert_eq!(
            resolve(env(&aws), Some(2)).unwrap(),
            (Shard { index: 1, count: 2 }, Scheduler::AwsBatch)
        );
        let torch = [("RANK", "3"), ("WORLD_SIZE", "4")];
        assert_eq!(
            resolve(env(&torch), None).unwrap(),
            (Shard { index: 3, count: 4 }, Scheduler::Torchrun)
        );
    }

    #[test]
    fn bad_or_missing_variables_are_errors() {
        for (pairs, needle) in [
            (&[][..], "no scheduler"),
            (&[("JOB_COMPLETION_INDEX", "1")][..], "--shard-count"),
            (
                &[("JOB_COMPLETION_INDEX", "x"), (COUNT_VAR, "2")][..],
                "JOB_COMPLETION_INDEX",
            ),
            (
                &[("JOB_COMPLETION_INDEX", "2"), (COUNT_VAR, "2")][..],
                "0 ≤ index",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "4"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_STEP", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                ][..],
                "not on the range",
            ),
        ] {
            let e = resolve(env(pairs), None).unwrap_err().to_string();
            assert!(e.contains(needle), "{pairs:?}: {e}");
        }
    }
}
