//! The two storage engines behind one small trait.
//!
//! Data model: log key = (id u32, offset u64), value = encoded record;
//! cursor key = (id u32, device name) -> offset u64.

use std::path::Path;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// Block/page cache given to either engine.
pub const CACHE_BYTES: usize = 8 << 20;

pub struct Append {
    pub id: u32,
    pub offset: u64,
    pub record: Vec<u8>,
}

pub struct CursorSet {
    pub id: u32,
    pub device: &'static str,
    pub offset: u64,
}

#[derive(Clone, Copy)]
pub enum Page {
    /// Records with offset < n, newest first (reverse range scan).
    Before(u64),
    /// Records with offset >= n, oldest first (forward range scan).
    From(u64),
}

pub trait Store: Sync {
    /// Applies appends and cursor updates atomically. With `durable`, the
    /// commit is fsynced before returning.
    fn commit(&self, appends: &[Append], cursors: &[CursorSet], durable: bool) -> Result<()>;
    /// Makes every earlier commit durable.
    fn sync(&self) -> Result<()>;
    /// Reads up to `limit` records of `id`, appending (offset BE ++ record)
    /// to `out` as a server would when building a reply. Returns the count
    /// and the offset of the last record returned.
    fn read_page(
        &self,
        id: u32,
        page: Page,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<u64>)>;
    fn cursor(&self, id: u32, device: &str) -> Result<Option<u64>>;
    /// Durably deletes offsets in `start..end` of `id`, with the engine's
    /// range-delete call or, with `by_key`, by reading the keys and removing
    /// them one by one in a single commit.
    fn delete_range(&self, id: u32, start: u64, end: u64, by_key: bool) -> Result<()>;
    /// Lets background work finish without calling non-public APIs.
    fn settle(&self) -> Result<()>;
    /// Forces space reclaim; returns a label saying what was called.
    fn compact(&mut self) -> Result<&'static str>;
}

pub fn open(engine: &str, dir: &Path) -> Result<Box<dyn Store>> {
    match engine {
        #[cfg(feature = "redb")]
        "redb" => Ok(Box::new(redb_store::RedbStore::open(dir)?)),
        #[cfg(feature = "fjall")]
        "fjall" => Ok(Box::new(fjall_store::FjallStore::open(dir)?)),
        other => Err(format!("engine {other:?} not known or not compiled in").into()),
    }
}

#[cfg(feature = "redb")]
mod redb_store {
    use super::{Append, CursorSet, Page, Result, Store, CACHE_BYTES};
    use redb::{Builder, Database, Durability, ReadableTable, TableDefinition};
    use std::path::Path;

    const LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log");
    const CURSOR: TableDefinition<(u32, &str), u64> = TableDefinition::new("cursor");

    pub struct RedbStore {
        db: Database,
    }

    impl RedbStore {
        pub fn open(dir: &Path) -> Result<Self> {
            let db = Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create(dir.join("log.redb"))?;
            // Create both tables so read transactions always find them.
            let tx = db.begin_write()?;
            tx.open_table(LOG)?;
            tx.open_table(CURSOR)?;
            tx.commit()?;
            Ok(Self { db })
        }
    }

    impl Store for RedbStore {
        fn commit(&self, appends: &[Append], cursors: &[CursorSet], durable: bool) -> Result<()> {
            let mut tx = self.db.begin_write()?;
            if !durable {
                tx.set_durability(Durability::None);
            } // else: the default, Durability::Immediate (fsync on commit)
            {
                let mut log = tx.open_table(LOG)?;
                for a in appends {
                    log.insert((a.id, a.offset), a.record.as_slice())?;
                }
                if !cursors.is_empty() {
                    let mut cur = tx.open_table(CURSOR)?;
                    for c in cursors {
                        cur.insert((c.id, c.device), c.offset)?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        }

        fn sync(&self) -> Result<()> {
            // An Immediate commit also makes all earlier Durability::None commits durable.
            self.db.begin_write()?.commit()?;
            Ok(())
        }

        fn read_page(
            &self,
            id: u32,
            page: Page,
            limit: usize,
            out: &mut Vec<u8>,
        ) -> Result<(usize, Option<u64>)> {
            let tx = self.db.begin_read()?;
            let log = tx.open_table(LOG)?;
            let range = match page {
                Page::Before(n) => log.range((id, 0)..(id, n))?,
                Page::From(n) => log.range((id, n)..=(id, u64::MAX))?,
            };
            let iter: Box<dyn Iterator<Item = _>> = match page {
                Page::Before(_) => Box::new(range.rev()),
                Page::From(_) => Box::new(range),
            };
            let (mut count, mut last) = (0, None);
            for item in iter.take(limit) {
                let (k, v) = item?;
                let offset = k.value().1;
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(v.value());
                count += 1;
                last = Some(offset);
            }
            Ok((count, last))
        }

        fn cursor(&self, id: u32, device: &str) -> Result<Option<u64>> {
            let tx = self.db.begin_read()?;
            let cur = tx.open_table(CURSOR)?;
            Ok(cur.get((id, device))?.map(|g| g.value()))
        }

        fn delete_range(&self, id: u32, start: u64, end: u64, by_key: bool) -> Result<()> {
            let tx = self.db.begin_write()?;
            {
                let mut log = tx.open_table(LOG)?;
                if by_key {
                    let mut offsets = Vec::new();
                    for item in log.range((id, start)..(id, end))? {
                        offsets.push(item?.0.value().1);
                    }
                    for offset in offsets {
                        log.remove((id, offset))?;
                    }
                } else {
                    // Table::retain_in removes every entry in the range for which
                    // the predicate is false.
                    log.retain_in((id, start)..(id, end), |_, _| false)?;
                }
            }
            tx.commit()?;
            Ok(())
        }

        fn settle(&self) -> Result<()> {
            Ok(()) // redb has no background work.
        }

        fn compact(&mut self) -> Result<&'static str> {
            self.db.compact()?;
            Ok("redb::Database::compact")
        }
    }
}

#[cfg(feature = "fjall")]
mod fjall_store {
    use super::{Append, CursorSet, Page, Result, Store, CACHE_BYTES};
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
    use std::path::Path;
    use std::time::{Duration, Instant};

    pub struct FjallStore {
        db: Database,
        log: Keyspace,
        cursor: Keyspace,
    }

    fn log_key(id: u32, offset: u64) -> [u8; 12] {
        let mut k = [0u8; 12];
        k[..4].copy_from_slice(&id.to_be_bytes());
        k[4..].copy_from_slice(&offset.to_be_bytes());
        k
    }

    fn cursor_key(id: u32, device: &str) -> Vec<u8> {
        let mut k = id.to_be_bytes().to_vec();
        k.extend_from_slice(device.as_bytes());
        k
    }

    impl FjallStore {
        pub fn open(dir: &Path) -> Result<Self> {
            let db = Database::builder(dir)
                .cache_size(CACHE_BYTES as u64)
                .open()?;
            let log = db.keyspace("log", KeyspaceCreateOptions::default)?;
            let cursor = db.keyspace("cursor", KeyspaceCreateOptions::default)?;
            Ok(Self { db, log, cursor })
        }
    }

    impl Store for FjallStore {
        fn commit(&self, appends: &[Append], cursors: &[CursorSet], durable: bool) -> Result<()> {
            let mut batch = self.db.batch();
            if durable {
                // WriteBatch::durability: the journal is fsynced (File::sync_all)
                // inside commit(), before it returns.
                batch = batch.durability(Some(PersistMode::SyncAll));
            }
            for a in appends {
                batch.insert(&self.log, &log_key(a.id, a.offset)[..], a.record.as_slice());
            }
            for c in cursors {
                batch.insert(
                    &self.cursor,
                    cursor_key(c.id, c.device).as_slice(),
                    &c.offset.to_be_bytes()[..],
                );
            }
            batch.commit()?;
            Ok(())
        }

        fn sync(&self) -> Result<()> {
            self.db.persist(PersistMode::SyncAll)?;
            Ok(())
        }

        fn read_page(
            &self,
            id: u32,
            page: Page,
            limit: usize,
            out: &mut Vec<u8>,
        ) -> Result<(usize, Option<u64>)> {
            let iter: Box<dyn Iterator<Item = fjall::Guard>> = match page {
                Page::Before(n) => Box::new(self.log.range(log_key(id, 0)..log_key(id, n)).rev()),
                Page::From(n) => Box::new(self.log.range(log_key(id, n)..=log_key(id, u64::MAX))),
            };
            let (mut count, mut last) = (0, None);
            for guard in iter.take(limit) {
                let (k, v) = guard.into_inner()?;
                let offset_bytes: [u8; 8] = k[4..12].try_into()?;
                out.extend_from_slice(&offset_bytes);
                out.extend_from_slice(&v);
                count += 1;
                last = Some(u64::from_be_bytes(offset_bytes));
            }
            Ok((count, last))
        }

        fn cursor(&self, id: u32, device: &str) -> Result<Option<u64>> {
            match self.cursor.get(cursor_key(id, device))? {
                Some(v) => Ok(Some(u64::from_be_bytes(v.as_ref().try_into()?))),
                None => Ok(None),
            }
        }

        fn delete_range(&self, id: u32, start: u64, end: u64, by_key: bool) -> Result<()> {
            if !by_key {
                return Err("fjall 3 has no public range delete; use --prune-by-key".into());
            }
            let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
            for guard in self.log.range(log_key(id, start)..log_key(id, end)) {
                batch.remove(&self.log, guard.key()?);
            }
            batch.commit()?;
            Ok(())
        }

        fn settle(&self) -> Result<()> {
            // Public API only: give background flush/compaction 10 s of idle time.
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        }

        fn compact(&mut self) -> Result<&'static str> {
            // Both calls are #[doc(hidden)]: there is no public way to force this.
            self.log.rotate_memtable_and_wait()?;
            self.log.major_compact()?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.db.active_compactions() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok("fjall Keyspace::rotate_memtable_and_wait + major_compact (doc-hidden)")
        }
    }
}
