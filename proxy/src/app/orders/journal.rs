//! The order journal: an append-only log of accepted orders and of their settlement (the
//! upstream's acknowledgement), in segment files, each record with its length and a CRC32,
//! made durable by group commit: any number of records are appended, then one `commit`
//! writes them and waits for `fdatasync`. An order is acknowledged to its client only after
//! the commit that carries it.
//!
//! On disk, in `dir`: `NNNNNNNNNNNNNNNNNNNN.journal` segments, named by the sequence number
//! of their first record. A record is
//! `len: u32 LE | crc32(body): u32 LE | body`, body = `kind: u8 | seq: u64 LE | payload`,
//! kind 1 = accepted (payload: the order, as received), kind 2 = settled (payload: none; `seq`
//! is the accepted record's).
//!
//! On open, every segment is read: an incomplete or corrupt record that runs to the end of
//! the last segment is a torn write (the process died mid-append) and is cut off; anything
//! else that does not check out is corruption, and opening fails naming the file and offset
//! (cutting it would lose orders clients were told were accepted). What was accepted and not
//! settled comes back, in order, to be sent again. A segment whose every order is settled is
//! removed.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Record kinds.
const ACCEPTED: u8 = 1;
const SETTLED: u8 = 2;
/// Length and CRC.
const FRAME: usize = 8;
/// Kind and sequence number.
const BODY_HEAD: usize = 9;
/// The largest record body read back; anything longer is not a record.
const MAX_BODY: usize = 1 << 20;

/// Where the journal lives and how large a segment grows before the next one starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub dir: PathBuf,
    pub segment_size: u64,
}

/// What opening found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Orders accepted and never settled, oldest first: (sequence number, payload).
    pub unsettled: Vec<(u64, Bytes)>,
    /// A torn last record that was cut off: the file, the offset it was cut at, and the
    /// bytes removed.
    pub cut: Option<(PathBuf, u64, u64)>,
}

struct Segment {
    first: u64,
    path: PathBuf,
    /// Accepted records in it not settled yet.
    unsettled: usize,
}

/// An open journal; one owner appends and commits (the gateway's journal thread).
pub struct Journal {
    settings: Settings,
    segments: VecDeque<Segment>,
    /// The last segment, open for appending, and its length.
    file: File,
    len: u64,
    /// Records appended since the last commit.
    pending: Vec<u8>,
    next_seq: u64,
    /// Records numbered below this were committed (or failed to be, and are forgotten).
    committed_seq: u64,
    /// Unsettled accepted records: sequence number to their segment's first sequence number.
    open: BTreeMap<u64, u64>,
    /// Settled since the last commit, their segments counted down at the commit.
    settling: Vec<u64>,
}

impl Journal {
    /// Opens (or creates) the journal in `settings.dir`, cutting a torn last record.
    pub fn open(settings: Settings) -> io::Result<(Journal, Recovered)> {
        std::fs::create_dir_all(&settings.dir)?;
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(&settings.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                let first = p
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".journal")?
                    .parse()
                    .ok()?;
                Some((first, p))
            })
            .collect();
        names.sort();
        let mut recovered = Recovered::default();
        let mut accepted: BTreeMap<u64, (u64, Bytes)> = BTreeMap::new();
        let mut segments = VecDeque::new();
        let mut next_seq = 1;
        let last = names.len().saturating_sub(1);
        for (i, (first, path)) in names.iter().enumerate() {
            let mut data = Vec::new();
            File::open(path)?.read_to_end(&mut data)?;
            let data = Bytes::from(data);
            let mut at = 0;
            while at < data.len() {
                match record(&data[at..]) {
                    Ok((kind, seq, payload, used)) => {
                        match kind {
                            ACCEPTED => {
                                accepted.insert(seq, (*first, data.slice_ref(payload)));
                            }
                            _ => {
                                accepted.remove(&seq);
                            }
                        }
                        next_seq = next_seq.max(seq + 1);
                        at += used;
                    }
                    Err(reaches_end) if i == last && reaches_end => {
                        let cut = (data.len() - at) as u64;
                        OpenOptions::new()
                            .write(true)
                            .open(path)?
                            .set_len(at as u64)?;
                        File::open(path)?.sync_all()?;
                        recovered.cut = Some((path.clone(), at as u64, cut));
                        break;
                    }
                    Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{}: corrupt record at offset {at} (not a torn last write; the \
                                 journal is left as it is)",
                                path.display()
                            ),
                        ));
                    }
                }
            }
            segments.push_back(Segment {
                first: *first,
                path: path.clone(),
                unsettled: 0,
            });
        }
        let mut open = BTreeMap::new();
        for (seq, (first, payload)) in accepted {
            if let Some(s) = segments.iter_mut().find(|s| s.first == first) {
                s.unsettled += 1;
            }
            open.insert(seq, first);
            recovered.unsettled.push((seq, payload));
        }
        if segments.is_empty() {
            segments.push_back(new_segment(&settings.dir, next_seq)?);
        }
        let tail = segments.back().expect("one segment at least");
        let file = OpenOptions::new().append(true).open(&tail.path)?;
        let len = file.metadata()?.len();
        let mut j = Journal {
            settings,
            segments,
            file,
            len,
            pending: Vec::new(),
            next_seq,
            committed_seq: next_seq,
            open,
            settling: Vec::new(),
        };
        j.remove_settled()?;
        Ok((j, recovered))
    }

    /// Appends an accepted order (durable at the next `commit`); returns its sequence number.
    pub fn append(&mut self, payload: &[u8]) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        put(&mut self.pending, ACCEPTED, seq, payload);
        let first = self.segments.back().expect("one segment at least").first;
        self.open.insert(seq, first);
        if let Some(s) = self.segments.back_mut() {
            s.unsettled += 1;
        }
        seq
    }

    /// Records that the order `seq` was settled (the upstream acknowledged it); unknown or
    /// already settled numbers are ignored.
    pub fn settle(&mut self, seq: u64) {
        if self.open.contains_key(&seq) {
            put(&mut self.pending, SETTLED, seq, &[]);
            self.settling.push(seq);
        }
    }

    /// Writes everything appended since the last commit and waits until it is on disk; then
    /// starts a new segment if this one is full, and removes segments wholly settled.
    /// An error means the records since the last commit are not durable and never will be:
    /// they are cut from the file and forgotten (the settles among them go again with the
    /// next commit). A failure after that (a new segment, a removal) is retried at the next
    /// commit and does not fail this one.
    pub fn commit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let written = self
            .file
            .write_all(&self.pending)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            self.pending.clear();
            // Settles are facts still: they go again with the next commit.
            for &seq in &self.settling {
                put(&mut self.pending, SETTLED, seq, &[]);
            }
            for seq in self.committed_seq..self.next_seq {
                if let Some(first) = self.open.remove(&seq) {
                    if let Some(s) = self.segments.iter_mut().find(|s| s.first == first) {
                        s.unsettled -= 1;
                    }
                }
            }
            self.committed_seq = self.next_seq;
            return Err(e);
        }
        self.committed_seq = self.next_seq;
        self.len += self.pending.len() as u64;
        self.pending.clear();
        for seq in self.settling.drain(..) {
            if let Some(first) = self.open.remove(&seq) {
                if let Some(s) = self.segments.iter_mut().find(|s| s.first == first) {
                    s.unsettled -= 1;
                }
            }
        }
        if let Err(e) = self.rotate().and_then(|()| self.remove_settled()) {
            tracing::warn!(
                dir = %self.settings.dir.display(),
                error = %e,
                "orders journal: segment rotation or removal failed; tried again at the next commit"
            );
        }
        Ok(())
    }

    /// Starts a new segment when this one is full.
    fn rotate(&mut self) -> io::Result<()> {
        if self.len >= self.settings.segment_size {
            let s = new_segment(&self.settings.dir, self.next_seq)?;
            self.file = OpenOptions::new().append(true).open(&s.path)?;
            self.len = 0;
            self.segments.push_back(s);
        }
        Ok(())
    }

    /// Accepted orders not settled yet.
    pub fn unsettled(&self) -> usize {
        self.open.len()
    }

    /// Segment files on disk.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Removes segments before the last whose every order is settled.
    fn remove_settled(&mut self) -> io::Result<()> {
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[0].unsettled == 0 {
            let s = self.segments.pop_front().expect("checked");
            std::fs::remove_file(&s.path)?;
            removed = true;
        }
        if removed {
            File::open(&self.settings.dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn new_segment(dir: &Path, first: u64) -> io::Result<Segment> {
    let path = dir.join(format!("{first:020}.journal"));
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?
        .sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(Segment {
        first,
        path,
        unsettled: 0,
    })
}

fn put(out: &mut Vec<u8>, kind: u8, seq: u64, payload: &[u8]) {
    let len = (BODY_HEAD + payload.len()) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + FRAME..]);
    out[start + 4..start + FRAME].copy_from_slice(&crc.to_le_bytes());
}

/// The record at the front of `b`: (kind, seq, payload, bytes used). Err(true): it is cut
/// short or does not check out and runs to the end of `b` (a torn write); Err(false): it
/// does not check out and more follows it.
fn record(b: &[u8]) -> Result<(u8, u64, &[u8], usize), bool> {
    let Some(head) = b.get(..FRAME) else {
        return Err(true);
    };
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if !(BODY_HEAD..=MAX_BODY).contains(&len) {
        // A length that cannot be: torn when nothing but zeros (or nothing) follows.
        return Err(b.iter().all(|&x| x == 0));
    }
    let Some(body) = b.get(FRAME..FRAME + len) else {
        return Err(true);
    };
    let kind = body[0];
    if crc32fast::hash(body) != crc || !matches!(kind, ACCEPTED | SETTLED) {
        return Err(FRAME + len == b.len());
    }
    let seq = u64::from_le_bytes(body[1..BODY_HEAD].try_into().expect("8 bytes"));
    Ok((kind, seq, &body[BODY_HEAD..], FRAME + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tag: &str, segment_size: u64) -> Settings {
        let dir =
            std::env::temp_dir().join(format!("fluxgate-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Settings { dir, segment_size }
    }

    #[test]
    fn what_is_committed_and_not_settled_comes_back_in_order() {
        let s = settings("basic", 1 << 20);
        let (mut j, r) = Journal::open(s.clone()).unwrap();
        assert!(r.unsettled.is_empty() && r.cut.is_none());
        let a = j.append(b"order-a");
        let b = j.append(b"order-b");
        let c = j.append(b"order-c");
        j.settle(b);
        j.commit().unwrap();
        // Appended but never committed: not there after a restart.
        j.append(b"lost");
        drop(j);
        let (mut j, r) = Journal::open(s.clone()).unwrap();
        let got: Vec<_> = r.unsettled.iter().map(|(q, p)| (*q, p.to_vec())).collect();
        assert_eq!(
            got,
            vec![(a, b"order-a".to_vec()), (c, b"order-c".to_vec())]
        );
        // Numbers go on after the last one seen.
        assert!(j.append(b"d") > c);
        assert_eq!(j.unsettled(), 3);
    }

    #[test]
    fn a_torn_last_record_is_cut_wherever_the_write_stopped() {
        let s = settings("torn", 1 << 20);
        let (mut j, _) = Journal::open(s.clone()).unwrap();
        j.append(b"first");
        j.commit().unwrap();
        j.append(b"second, torn");
        j.commit().unwrap();
        drop(j);
        let path = s.dir.join(format!("{:020}.journal", 1));
        let whole = std::fs::read(&path).unwrap();
        let first_len = FRAME + BODY_HEAD + 5;
        for keep in first_len..whole.len() {
            std::fs::write(&path, &whole[..keep]).unwrap();
            let (_, r) = Journal::open(s.clone()).unwrap();
            let got: Vec<_> = r.unsettled.iter().map(|(_, p)| p.to_vec()).collect();
            assert_eq!(got, vec![b"first".to_vec()], "kept {keep}");
            match keep == first_len {
                true => assert!(r.cut.is_none()),
                false => assert_eq!(r.cut.as_ref().map(|c| c.1), Some(first_len as u64)),
            }
            assert_eq!(std::fs::metadata(&path).unwrap().len(), first_len as u64);
        }
        // A flipped bit in the last record is torn too; in an earlier one it is corruption.
        let mut bad = whole.clone();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(Journal::open(s.clone()).unwrap().1.cut.is_some());
        let mut bad = whole.clone();
        bad[FRAME + 2] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = Journal::open(s.clone())
            .err()
            .expect("corruption is refused");
        assert!(err.to_string().contains("offset 0"), "{err}");
    }

    #[test]
    fn segments_roll_over_and_go_once_settled() {
        let s = settings("segments", 256);
        let (mut j, _) = Journal::open(s.clone()).unwrap();
        let mut seqs = Vec::new();
        for i in 0..40 {
            seqs.push(j.append(format!("order {i:03} with some bytes").as_bytes()));
            j.commit().unwrap();
        }
        assert!(j.segments() > 3, "{}", j.segments());
        let before = j.segments();
        // Settling all but the last order leaves only the segments still needed.
        for q in &seqs[..39] {
            j.settle(*q);
        }
        j.commit().unwrap();
        assert!(j.segments() < before);
        drop(j);
        let (j, r) = Journal::open(s.clone()).unwrap();
        assert_eq!(r.unsettled.len(), 1);
        assert_eq!(r.unsettled[0].0, seqs[39]);
        assert_eq!(j.unsettled(), 1);
        let on_disk = std::fs::read_dir(&s.dir).unwrap().count();
        assert_eq!(on_disk, j.segments());
    }
}
