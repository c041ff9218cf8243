//! When files changed: `FileWatch` looks at a few files' metadata on an interval and
//! says when one of them is not as it was. The TLS files and the JWKS files are re-read
//! on it. It imports no other keygate module.
//!
//! A file's version is its modification time, length and inode, read through symlinks: a
//! rewrite in place changes the first (and mostly the length, within the file system's
//! timestamp granularity), a file moved into place the inode. So does a Kubernetes
//! ConfigMap or Secret update, which swaps the `..data` symlink the mounted path resolves
//! through: inotify (the `notify` crate) on the path misses that, polling its metadata
//! does not, for one `stat` per file per interval. A missing file is a version too: its
//! removal and its return are both changes.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Watches a few files for a change. Each clone sees the changes on its own.
#[derive(Debug, Clone)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    interval: Duration,
    /// The files as they were when last seen: at `new`, or at the last change reported.
    seen: Vec<Option<Version>>,
}

/// What tells one version of a file from the next.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    modified: SystemTime,
    len: u64,
    inode: (u64, u64),
}

impl FileWatch {
    /// Watches `paths`, looked at every `interval`, taking them as they are now as seen.
    /// Made before the files are first read, a change made while they are read is seen.
    pub fn new<P: Into<PathBuf>>(
        paths: impl IntoIterator<Item = P>,
        interval: Duration,
    ) -> FileWatch {
        let paths: Vec<PathBuf> = paths.into_iter().map(Into::into).collect();
        let seen = paths
            .iter()
            .map(|p| version(std::fs::metadata(p)))
            .collect();
        FileWatch {
            paths,
            interval,
            seen,
        }
    }

    /// Waits until the files are not as they were last seen, and takes them as seen: a
    /// change made while the caller reads them is the next one. Cancel-safe (beside a
    /// shutdown signal or SIGHUP in a `select!`).
    pub async fn changed(&mut self) {
        while !self.check().await {}
    }

    /// Waits one interval, then says whether the files changed since they were last seen
    /// (and takes them as seen): for a caller that also retries at each look while a
    /// version fails to read. Cancel-safe.
    pub async fn check(&mut self) -> bool {
        tokio::time::sleep(self.interval).await;
        let mut now = Vec::with_capacity(self.paths.len());
        for path in &self.paths {
            now.push(version(tokio::fs::metadata(path).await));
        }
        if now == self.seen {
            return false;
        }
        self.seen = now;
        true
    }
}

fn version(metadata: std::io::Result<std::fs::Metadata>) -> Option<Version> {
    let m = metadata.ok()?;
    Some(Version {
        modified: m.modified().ok()?,
        len: m.len(),
        inode: (m.dev(), m.ino()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const INTERVAL: Duration = Duration::from_secs(1);

    /// Longer than any wait for a change made before it (the clock is paused: free).
    const PATIENCE: Duration = Duration::from_secs(60);

    async fn reported(w: &mut FileWatch) -> bool {
        tokio::time::timeout(PATIENCE, w.changed()).await.is_ok()
    }

    /// `path` moved into place with `text` and `modified`, as a deployment writes it.
    fn replace(path: &Path, text: &str, modified: SystemTime) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        let f = std::fs::File::options().write(true).open(&tmp).unwrap();
        f.set_modified(modified).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rewrite_is_reported_once_and_no_change_never() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, "routes: []\n").unwrap();
        let mut w = FileWatch::new([&path], INTERVAL);
        assert!(!reported(&mut w).await, "nothing changed");
        std::fs::write(&path, "routes: [a]\n").unwrap();
        assert!(reported(&mut w).await, "rewritten");
        assert!(!reported(&mut w).await, "reported once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_file_is_reported_when_created_and_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let mut w = FileWatch::new([&path], INTERVAL);
        assert!(!reported(&mut w).await, "still missing");
        std::fs::write(&path, "{}").unwrap();
        assert!(reported(&mut w).await, "created");
        std::fs::remove_file(&path).unwrap();
        assert!(reported(&mut w).await, "removed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_moved_into_place_is_reported_with_its_time_and_length_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.key");
        let then = SystemTime::now() - Duration::from_secs(3600);
        replace(&path, "one", then);
        let mut w = FileWatch::new([&path], INTERVAL);
        replace(&path, "two", then);
        assert!(reported(&mut w).await);
    }

    /// A Kubernetes ConfigMap volume: the path is a symlink through `..data`, which an
    /// update points at a new directory.
    #[tokio::test(start_paused = true)]
    async fn a_configmap_update_swapping_the_data_symlink_is_reported() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let then = SystemTime::now() - Duration::from_secs(3600);
        for version in ["..v1", "..v2"] {
            std::fs::create_dir(d.join(version)).unwrap();
            replace(&d.join(version).join("policy.yaml"), "same", then);
        }
        symlink("..v1", d.join("..data")).unwrap();
        symlink("..data/policy.yaml", d.join("policy.yaml")).unwrap();
        let mut w = FileWatch::new([d.join("policy.yaml")], INTERVAL);
        assert!(!reported(&mut w).await);
        symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        assert!(reported(&mut w).await);
    }

    #[tokio::test(start_paused = true)]
    async fn any_of_the_files_changing_is_a_change_and_a_look_says_whether_there_was_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, "cert").unwrap();
        std::fs::write(&key, "key").unwrap();
        let mut w = FileWatch::new([&cert, &key], INTERVAL);
        assert!(!w.check().await);
        std::fs::write(&key, "renewed key").unwrap();
        assert!(w.check().await);
        assert!(!w.check().await);
    }
}
