//! A download's landed byte ranges, and readers over its file whose reads wait for their
//! bytes: what lets an archive be unpacked while it downloads.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Which byte ranges of a download's file have been written, for readers that consume the
/// file while it downloads.
pub(super) struct Landing {
    state: std::sync::Mutex<LandingState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct LandingState {
    /// Sorted, disjoint, non-adjacent.
    ranges: Vec<Range<u64>>,
    /// The download stopped; bytes not landed by now never will.
    over: bool,
}

impl Landing {
    pub(super) fn new() -> Self {
        Landing {
            state: std::sync::Mutex::new(LandingState::default()),
            changed: std::sync::Condvar::new(),
        }
    }

    pub(super) fn add(&self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ranges = &mut state.ranges;
        let at = ranges.partition_point(|r| r.end < range.start);
        let mut merged = range;
        while at < ranges.len() && ranges[at].start <= merged.end {
            merged.start = merged.start.min(ranges[at].start);
            merged.end = merged.end.max(ranges[at].end);
            ranges.remove(at);
        }
        ranges.insert(at, merged);
        drop(state);
        self.changed.notify_all();
    }

    /// Marks the download over (finished or failed): waiting readers stop waiting.
    fn end(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).over = true;
        self.changed.notify_all();
    }

    /// Blocks until byte `pos` has landed; returns how many bytes from `pos` on have.
    fn wait(&self, pos: u64) -> std::io::Result<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let at = state.ranges.partition_point(|r| r.end <= pos);
            if let Some(r) = state.ranges.get(at).filter(|r| r.start <= pos) {
                return Ok(r.end - pos);
            }
            if state.over {
                return Err(std::io::Error::other(
                    "the archive's download stopped before these bytes arrived",
                ));
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Ends the landing when dropped: whatever way a download stops, its readers are released.
pub(super) struct EndLanding(pub(super) Option<Arc<Landing>>);

impl Drop for EndLanding {
    fn drop(&mut self) {
        if let Some(landing) = &self.0 {
            landing.end();
        }
    }
}

/// A reader over a file being downloaded: reads wait until their bytes have landed.
pub(super) struct LandingReader {
    pub(super) file: Arc<File>,
    pub(super) landing: Arc<Landing>,
    pub(super) size: u64,
    pub(super) pos: u64,
}

impl Read for LandingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let ready = self.landing.wait(self.pos)?;
        let want = buf
            .len()
            .min(usize::try_from(ready.min(self.size - self.pos)).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for LandingReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = base.ok_or_else(|| {
            std::io::Error::new(ErrorKind::InvalidInput, "seek before the start of the file")
        })?;
        Ok(self.pos)
    }
}

/// Hands a consumer the download's file and size once the file exists.
pub(super) type FileSender = tokio::sync::oneshot::Sender<(Arc<File>, u64)>;

/// Opens readers over a download's file (each with its own position).
pub type Reopen =
    Arc<dyn Fn() -> std::io::Result<Box<dyn torchfn_archive::mar::ReadSeek>> + Send + Sync>;
