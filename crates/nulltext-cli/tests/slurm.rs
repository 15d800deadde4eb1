//! deploy/slurm/pie-bench.sbatch on a real Slurm: a one-node cluster of this machine
//! (tools/slurm-local.sh: munged, slurmctld and slurmd with their own slurm.conf in a
//! temporary folder), `sbatch --array=0-2 --wait` over the fixture PIE-Bench (with three bad
//! entries) on the tiny model, the dependent report job, and the report equal to that of one
//! process. Without Slurm the test fails saying what to install; `NULLTEXT_SKIP_SLURM=1`
//! skips it explicitly.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Stops the cluster however the test ends.
struct Cluster<'a>(&'a Path);

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        let _ = Command::new(root().join("tools/slurm-local.sh"))
            .arg("stop")
            .arg(self.0)
            .output();
    }
}

const BATCH_ARGS: &str = "--steps 3 --size 128";

#[test]
fn pie_bench_job_array_on_slurm_equals_one_process() {
    if std::env::var("NULLTEXT_SKIP_SLURM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: the Slurm test (NULLTEXT_SKIP_SLURM=1)");
        return;
    }
    let dir = tmp("slurm");
    let started = std::time::Instant::now();
    let up = Command::new(root().join("tools/slurm-local.sh"))
        .arg("start")
        .arg(dir.join("cluster"))
        .output()
        .expect("run tools/slurm-local.sh");
    let _cluster = Cluster(&dir.join("cluster"));
    assert!(
        up.status.success(),
        "Slurm cannot start here:\n{}\nInstall Debian's slurm-wlm and munge (tools/test-deps.sh does) and run as root, or set NULLTEXT_SKIP_SLURM=1 to skip this test.",
        text(&up)
    );
    let data = pie_bench_with_bad_entries(&dir);

    // The shipped job file without its GPU and memory requests (this node has neither).
    let shipped = std::fs::read_to_string(root().join("deploy/slurm/pie-bench.sbatch")).unwrap();
    let dropped = |l: &str| l.starts_with("#SBATCH --gres") || l.starts_with("#SBATCH --mem");
    assert_eq!(shipped.lines().filter(|l| dropped(l)).count(), 2);
    let job: String = shipped
        .lines()
        .filter(|l| !dropped(l))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("pie-bench.sbatch"), job).unwrap();

    let out_dir = dir.join("slurm/pie-bench");
    let sbatch = |args: &[&str]| -> Output {
        Command::new("sbatch")
            .args(args)
            .current_dir(&dir)
            .env(
                "PATH",
                format!("{}:/usr/sbin", std::env::var("PATH").unwrap()),
            )
            .env("SLURM_CONF", dir.join("cluster/slurm.conf"))
            .env("PIE_BENCH", &data)
            .env("MODEL", tiny())
            .env("OUT_DIR", &out_dir)
            .env("METHOD", "ddim")
            .env("DEVICE", "cpu")
            .env("NULLTEXT", env!("CARGO_BIN_EXE_nulltext"))
            .env("NULLTEXT_ARGS", BATCH_ARGS)
            .env("RAYON_NUM_THREADS", "1")
            .env_remove("NULLTEXT_MODEL")
            .output()
            .expect("run sbatch")
    };
    let array = sbatch(&["--parsable", "--wait", "--array=0-2", "pie-bench.sbatch"]);
    // Exit status 1: the tasks with a bad entry report it; the others succeed.
    assert_eq!(array.status.code(), Some(1), "{}", text(&array));
    let job_id = String::from_utf8_lossy(&array.stdout).trim().to_string();
    let report = sbatch(&[
        "--parsable",
        "--wait",
        &format!("--dependency=afterany:{job_id}"),
        "--export=ALL,STAGE=report",
        "pie-bench.sbatch",
    ]);
    assert!(report.status.success(), "{}", text(&report));
    for task in 0..3 {
        let log =
            std::fs::read_to_string(dir.join(format!("pie-bench-{job_id}_{task}.out"))).unwrap();
        assert!(
            log.contains(&format!("shard {task}/3 from the Slurm job array")),
            "{log}"
        );
    }

    // One process, the same settings.
    let batch = |out_dir: &Path, extra: &[&str]| {
        let mut args = vec!["--device", "cpu", "batch", "--pie-bench", s(&data)];
        args.extend(["--out-dir", s(out_dir), "--model", tiny_arg()]);
        args.extend(["--method", "ddim"]);
        args.extend(extra);
        args.extend(BATCH_ARGS.split(' '));
        command(&args, "1")
    };
    let single = dir.join("single/pie-bench");
    let one = batch(&single, &[]).output().unwrap();
    assert_eq!(one.status.code(), Some(1), "{}", text(&one));
    for (what, extra) in [
        ("report", &[][..]),
        ("report-by-edit-type", &["--by-edit-type"][..]),
    ] {
        let prefix = dir.join("single").join(what);
        let mut a = vec!["report", s(&single), "--out", s(&prefix)];
        a.extend(extra);
        let o = command(&a, "1").output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let theirs = std::fs::read_to_string(out_dir.join(format!("{what}.csv"))).unwrap();
        let ours = std::fs::read_to_string(prefix.with_extension("csv")).unwrap();
        assert_eq!(
            theirs, ours,
            "{what}: the job array's table differs from one process's"
        );
    }
    let table = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    eprintln!("{table}");
    // Four photos finished, the three bad entries failed with their reasons.
    assert!(table.contains("| pie-bench | ddim | 4 | 3 |"), "{table}");
    for (id, why) in [
        ("000000000099", "no such image"),
        ("100000000000", "is not a non-negative integer"),
        ("a00000000000", "editing_type_id `10`"),
    ] {
        let e = std::fs::read_to_string(out_dir.join(format!("items/{id}/error.json"))).unwrap();
        assert!(e.contains(why), "{id}: {e}");
    }

    // A retried task (same index) resumes: everything of its shard is skipped.
    let again = batch(&out_dir, &["--shard", "auto"])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_MIN", "0")
        .env("SLURM_ARRAY_TASK_STEP", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .unwrap();
    let log = text(&again);
    assert!(
        log.contains("shard 1/3: 0 done, 1 skipped (finished before), 1 failed"),
        "{log}"
    );
    eprintln!(
        "Slurm test: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    drop(_cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
