//! Finding the PostgreSQL programs: one directory holding all of them.

use super::*;

/// Where the PostgreSQL programs live. All required ones come from one
/// directory so that `initdb`, the server and `pg_basebackup` share a version.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bindir: PathBuf,
    pub initdb: PathBuf,
    pub pg_ctl: PathBuf,
    pub postgres: PathBuf,
    pub pg_basebackup: PathBuf,
    pub psql: PathBuf,
    /// Optional: only the demo needs it.
    pub pgbench: Option<PathBuf>,
}

impl PgBinaries {
    /// Searches `$PGMUX_PG_BINDIR` (if set, exclusively), then `PATH`,
    /// `pg_config --bindir` and `/usr/lib/postgresql/*/bin` (newest first).
    pub fn find() -> Result<PgBinaries, ClusterError> {
        let path_dirs: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        let overridden = std::env::var_os(BINDIR_ENV);
        let (candidates, searched) = match &overridden {
            Some(dir) => (vec![PathBuf::from(dir)], format!("${BINDIR_ENV} ({})", Path::new(dir).display())),
            None => (candidate_dirs(&path_dirs), "PATH, `pg_config --bindir`, /usr/lib/postgresql/*/bin".to_string()),
        };
        // Prefer one directory holding everything (a consistent installation)...
        if let Some(dir) = candidates.iter().find(|d| REQUIRED.iter().all(|b| is_executable(&d.join(b)))) {
            return Ok(PgBinaries::in_dir(dir, &path_dirs));
        }
        // ...and otherwise name what is nowhere to be found.
        let found = |b: &str| {
            candidates.iter().any(|d| is_executable(&d.join(b)))
                || (overridden.is_none() && find_in(&path_dirs, b).is_some())
        };
        let missing: Vec<&str> = REQUIRED.iter().copied().filter(|b| !found(b)).collect();
        let missing = if missing.is_empty() {
            format!("none, but they are spread over several directories; set ${BINDIR_ENV} to one holding them all")
        } else {
            missing.join(", ")
        };
        Err(ClusterError::BinariesNotFound { missing, searched })
    }

    fn in_dir(dir: &Path, path_dirs: &[PathBuf]) -> PgBinaries {
        let pgbench = Some(dir.join("pgbench")).filter(|p| is_executable(p)).or_else(|| find_in(path_dirs, "pgbench"));
        PgBinaries {
            bindir: dir.to_owned(),
            initdb: dir.join("initdb"),
            pg_ctl: dir.join("pg_ctl"),
            postgres: dir.join("postgres"),
            pg_basebackup: dir.join("pg_basebackup"),
            psql: dir.join("psql"),
            pgbench,
        }
    }

    /// `postgres --version`, e.g. `postgres (PostgreSQL) 15.8 (Debian 15.8-1)`.
    pub fn version(&self) -> Result<String, ClusterError> {
        let mut cmd = Command::new(&self.postgres);
        cmd.arg("--version");
        run(&mut cmd, "postgres --version")
    }
}

/// Candidate bin directories in search order, without duplicates.
pub(super) fn candidate_dirs(path_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    // A PATH entry is often a symlink farm (/usr/local/bin/initdb ->
    // /usr/lib/postgresql/15/bin/initdb); the real directory is the one with
    // the full set. Debian's pg_wrapper has no initdb, so it is skipped here.
    for d in path_dirs {
        if let Ok(real) = fs::canonicalize(d.join("initdb"))
            && real.file_name().is_some_and(|n| n == "initdb")
            && let Some(parent) = real.parent()
        {
            dirs.push(parent.to_owned());
        }
    }
    if let Some(pg_config) = find_in(path_dirs, "pg_config")
        && let Ok(out) = Command::new(pg_config).arg("--bindir").stderr(Stdio::null()).output()
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            dirs.push(PathBuf::from(dir));
        }
    }
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.split('.').map(|s| s.parse().ok()).collect::<Option<Vec<u32>>>()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by(|a, b| b.0.cmp(&a.0));
    dirs.extend(versioned.into_iter().map(|(_, d)| d));

    let mut seen = HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

pub(super) fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| is_executable(p))
}

pub(super) fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
