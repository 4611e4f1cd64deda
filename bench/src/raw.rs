//! The hardware baseline: plain libc sequential `pwrite` + `fdatasync`, the
//! least any durable log has to do.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the file looks like before the timed writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Empty: every write extends it, so every sync also commits a size change.
    Growing,
    /// Zero-filled to its full size and synced at creation (not timed).
    Prewritten,
}

/// A file written sequentially, every write followed by `fdatasync`.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    position: u64,
    /// Non-zero bytes, so writes over a pre-written file really change it.
    data: Vec<u8>,
}

fn pwrite_all(fd: RawFd, buf: &[u8], mut position: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        let offset = libc::off_t::try_from(position).map_err(io::Error::other)?;
        // SAFETY: `rest` is a live buffer of `rest.len()` bytes and `fd` is open.
        let n = unsafe { libc::pwrite(fd, rest.as_ptr().cast(), rest.len(), offset) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote nothing"));
        }
        done += n as usize;
        position += n as u64;
    }
    Ok(())
}

fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::fdatasync(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl RawFile {
    /// Creates (truncates) `path` for up to `size` bytes in writes of at
    /// most `write_bytes_max`; a pre-written file is zero-filled and synced.
    pub fn create(path: PathBuf, layout: Layout, size: u64, write_bytes_max: usize) -> io::Result<RawFile> {
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&path)?;
        if layout == Layout::Prewritten {
            let zeros = vec![0u8; 1 << 20];
            let mut position = 0;
            while position < size {
                let n = (size - position).min(zeros.len() as u64) as usize;
                pwrite_all(file.as_raw_fd(), &zeros[..n], position)?;
                position += n as u64;
            }
            fdatasync(file.as_raw_fd())?;
        }
        Ok(RawFile {
            file,
            path,
            position: 0,
            data: (0..write_bytes_max).map(|i| (i % 251) as u8 | 1).collect(),
        })
    }

    /// Writes `len` bytes after the previous write, then `fdatasync`s;
    /// returns the time both took.
    pub fn write_synced(&mut self, len: usize) -> io::Result<Duration> {
        let fd = self.file.as_raw_fd();
        let start = Instant::now();
        pwrite_all(fd, &self.data[..len], self.position)?;
        fdatasync(fd)?;
        let took = start.elapsed();
        self.position += len as u64;
        Ok(took)
    }

    /// Closes and deletes the file.
    pub fn remove(self) -> io::Result<()> {
        drop(self.file);
        std::fs::remove_file(&self.path)
    }
}
