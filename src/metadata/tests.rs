use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;

fn open() -> (tempfile::TempDir, MetaStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = MetaStore::open(&dir.path().join("metadata.redb")).unwrap();
    (dir, store)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

const USAGE: Usage = Usage { size: 4096, inodes: 3 };

/// A committed snapshot `name` on `parent`, made the way an ordinary layer is: prepare,
/// then commit.
fn committed(store: &MetaStore, name: &str, parent: Option<&str>) -> SnapshotRecord {
    let key = format!("extract {name}");
    store.create(&key, parent, Kind::Active, no_labels()).unwrap();
    store.commit(name, &key, no_labels(), USAGE).unwrap()
}

/// Writes raw bytes as the record of `key`, bypassing every check.
fn write_raw(path: &Path, key: &str, bytes: &[u8]) {
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(RECORDS).unwrap().insert(key, bytes).unwrap();
    txn.commit().unwrap();
}

#[test]
fn store_and_errors_can_cross_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<MetaStore>();
    assert_send_sync::<MetadataError>();
}

#[test]
fn create_records_and_get_reads_back() {
    let (_dir, store) = open();
    let record = store.create("a", None, Kind::Active, labels(&[("x", "1")])).unwrap();
    assert_eq!(record.key, "a");
    assert_eq!(record.parent, None);
    assert_eq!(record.kind, Kind::Active);
    assert_eq!(record.labels, labels(&[("x", "1")]));
    assert_eq!(record.created, record.updated);
    assert_eq!(record.usage, None);
    assert_eq!(record.remote, None);
    assert_eq!(store.get("a").unwrap(), Some(record));
    assert_eq!(store.get("b").unwrap(), None);
}

#[test]
fn create_view_on_committed_parent() {
    let (_dir, store) = open();
    committed(&store, "base", None);
    let view = store.create("v", Some("base"), Kind::View, no_labels()).unwrap();
    assert_eq!(view.kind, Kind::View);
    assert_eq!(view.parent.as_deref(), Some("base"));
    assert!(store.has_children("base").unwrap());
    assert!(!store.has_children("v").unwrap());
    assert!(!store.has_children("missing").unwrap());
}

#[test]
fn commit_remote_attaches_remote_data_in_the_same_commit() {
    let (_dir, store) = open();
    store.create("active", None, Kind::Active, labels(&[("a", "1")])).unwrap();
    store.create("taken", None, Kind::Active, no_labels()).unwrap();
    let remote = r#"{"source":"example"}"#.to_owned();
    let refused = store.commit_remote("taken", "active", no_labels(), USAGE, remote.clone());
    assert!(matches!(refused, Err(MetadataError::AlreadyExists { .. })));
    let untouched = store.get("active").unwrap().unwrap();
    assert_eq!((untouched.kind, untouched.remote), (Kind::Active, None), "a refused commit changes nothing");
    let record = store.commit_remote("model", "active", no_labels(), USAGE, remote.clone()).unwrap();
    assert_eq!((record.kind, record.remote.as_ref(), record.usage), (Kind::Committed, Some(&remote), Some(USAGE)));
    assert_eq!(store.get("model").unwrap().unwrap(), record);
    assert_eq!(record.labels, labels(&[("a", "1")]), "empty commit labels keep the snapshot's own");
}

#[test]
fn create_committed_keeps_remote_data_and_usage() {
    let (_dir, store) = open();
    committed(&store, "base", None);
    let remote = r#"{"artifact":"example"}"#.to_owned();
    let record =
        store.create_committed("model", Some("base"), labels(&[("ref", "m")]), Some(remote.clone()), USAGE).unwrap();
    assert_eq!(record.kind, Kind::Committed);
    assert_eq!(record.remote, Some(remote));
    assert_eq!(record.usage, Some(USAGE));
    assert_eq!(store.get("model").unwrap(), Some(record));
    // A remote snapshot is a parent like any other committed one.
    store.create("rootfs", Some("model"), Kind::Active, no_labels()).unwrap();
    assert!(store.has_children("model").unwrap());
}

#[test]
fn empty_label_values_are_not_stored() {
    let (_dir, store) = open();
    let record = store.create("a", None, Kind::Active, labels(&[("x", "1"), ("y", "")])).unwrap();
    assert_eq!(record.labels, labels(&[("x", "1")]));
}

#[test]
fn not_found_errors() {
    let (_dir, store) = open();
    assert!(matches!(store.remove("nope"), Err(MetadataError::NotFound { key }) if key == "nope"));
    assert!(matches!(
        store.commit("name", "nope", no_labels(), USAGE),
        Err(MetadataError::NotFound { key }) if key == "nope"
    ));
    assert!(matches!(store.update_labels("nope", no_labels(), &[]), Err(MetadataError::NotFound { .. })));
    assert!(matches!(store.ancestors("nope"), Err(MetadataError::NotFound { .. })));
    let message = store.remove("nope").unwrap_err().to_string();
    assert_eq!(message, "snapshot nope does not exist");
}

#[test]
fn already_exists_errors() {
    let (_dir, store) = open();
    store.create("a", None, Kind::Active, no_labels()).unwrap();
    committed(&store, "c", None);
    let err = store.create("a", None, Kind::View, no_labels()).unwrap_err();
    assert!(matches!(&err, MetadataError::AlreadyExists { key } if key == "a"));
    assert_eq!(err.to_string(), "snapshot a already exists");
    assert!(matches!(
        store.create_committed("c", None, no_labels(), None, USAGE),
        Err(MetadataError::AlreadyExists { key }) if key == "c"
    ));
    assert!(matches!(
        store.commit("c", "a", no_labels(), USAGE),
        Err(MetadataError::AlreadyExists { key }) if key == "c"
    ));
    // Committing onto its own key is a commit onto a taken name.
    assert!(matches!(store.commit("a", "a", no_labels(), USAGE), Err(MetadataError::AlreadyExists { .. })));
    // The failed commits changed nothing.
    assert_eq!(store.get("a").unwrap().unwrap().kind, Kind::Active);
}

#[test]
fn parent_errors() {
    let (_dir, store) = open();
    assert!(matches!(
        store.create("a", Some("p"), Kind::Active, no_labels()),
        Err(MetadataError::ParentNotFound { key, parent }) if key == "a" && parent == "p"
    ));
    assert!(matches!(
        store.create_committed("a", Some("p"), no_labels(), None, USAGE),
        Err(MetadataError::ParentNotFound { .. })
    ));
    store.create("active", None, Kind::Active, no_labels()).unwrap();
    store.create("view", None, Kind::View, no_labels()).unwrap();
    for parent in ["active", "view"] {
        assert!(matches!(
            store.create("a", Some(parent), Kind::View, no_labels()),
            Err(MetadataError::ParentNotCommitted { key, parent: p }) if key == "a" && p == parent
        ));
    }
    // Nothing was recorded and no child links were left behind.
    assert_eq!(store.get("a").unwrap(), None);
    assert!(!store.has_children("active").unwrap());
    assert!(!store.has_children("p").unwrap());
}

#[test]
fn only_active_snapshots_commit() {
    let (_dir, store) = open();
    store.create("view", None, Kind::View, no_labels()).unwrap();
    committed(&store, "done", None);
    for key in ["view", "done"] {
        assert!(matches!(
            store.commit("name", key, no_labels(), USAGE),
            Err(MetadataError::NotActive { key: k }) if k == key
        ));
    }
    assert_eq!(store.get("name").unwrap(), None);
}

#[test]
fn create_refuses_committed_kind() {
    let (_dir, store) = open();
    let err = store.create("a", None, Kind::Committed, no_labels()).unwrap_err();
    assert!(matches!(&err, MetadataError::InvalidKind { key, kind: Kind::Committed } if key == "a"));
    assert!(err.to_string().contains("cannot be created committed"), "{err}");
    assert_eq!(store.get("a").unwrap(), None);
}

#[test]
fn invalid_keys() {
    let (_dir, store) = open();
    store.create("a", None, Kind::Active, no_labels()).unwrap();
    assert!(matches!(store.create("", None, Kind::Active, no_labels()), Err(MetadataError::InvalidKey { .. })));
    assert!(matches!(
        store.create_committed("", None, no_labels(), None, USAGE),
        Err(MetadataError::InvalidKey { .. })
    ));
    assert!(matches!(store.create("b", Some(""), Kind::Active, no_labels()), Err(MetadataError::InvalidKey { .. })));
    assert!(matches!(store.commit("", "a", no_labels(), USAGE), Err(MetadataError::InvalidKey { .. })));
}

#[test]
fn label_size_limit_and_empty_key() {
    let (_dir, store) = open();
    let at_limit = labels(&[("k", &"v".repeat(MAX_LABEL_SIZE - 1))]);
    store.create("fits", None, Kind::Active, at_limit).unwrap();

    let over = labels(&[("k", &"v".repeat(MAX_LABEL_SIZE))]);
    let err = store.create("over", None, Kind::Active, over.clone()).unwrap_err();
    assert!(matches!(&err, MetadataError::InvalidLabel { key, .. } if key == "k"), "{err}");
    assert!(err.to_string().contains("4097 bytes"), "{err}");
    assert_eq!(store.get("over").unwrap(), None);

    let empty_key = labels(&[("", "v")]);
    assert!(matches!(
        store.create("e", None, Kind::Active, empty_key.clone()),
        Err(MetadataError::InvalidLabel { key, .. }) if key.is_empty()
    ));
    assert!(matches!(
        store.create_committed("e", None, empty_key, None, USAGE),
        Err(MetadataError::InvalidLabel { .. })
    ));
    assert!(matches!(store.commit("name", "fits", over.clone(), USAGE), Err(MetadataError::InvalidLabel { .. })));
    assert_eq!(store.get("fits").unwrap().unwrap().kind, Kind::Active);
    assert!(matches!(store.update_labels("fits", over, &[]), Err(MetadataError::InvalidLabel { .. })));
}

#[test]
fn label_count_and_total_are_bounded() {
    let (_dir, store) = open();
    let many: BTreeMap<String, String> = (0..=MAX_LABELS).map(|i| (format!("k{i:04}"), "v".to_owned())).collect();
    let err = store.create("many", None, Kind::Active, many.clone()).unwrap_err();
    let last = format!("k{MAX_LABELS:04}");
    assert!(matches!(&err, MetadataError::InvalidLabel { key, .. } if *key == last), "{err}");
    assert!(err.to_string().contains(&last), "the message names the key: {err}");
    let mut at_count = many;
    at_count.remove(&last);
    store.create("at-count", None, Kind::Active, at_count).unwrap();

    let big = "v".repeat(MAX_LABEL_SIZE - 8);
    let heavy: BTreeMap<String, String> =
        (0..MAX_LABELS_SIZE / MAX_LABEL_SIZE + 1).map(|i| (format!("k{i:04}"), big.clone())).collect();
    let err = store.create("heavy", None, Kind::Active, heavy).unwrap_err();
    assert!(matches!(&err, MetadataError::InvalidLabel { .. }), "{err}");
    assert!(err.to_string().contains("together"), "{err}");

    // An update is checked on the labels it leaves, not only on those it names.
    let grow: BTreeMap<String, String> = [("one-more".to_owned(), "v".to_owned())].into();
    let e = store.update_labels("at-count", grow, &["labels.one-more".to_owned()]).unwrap_err();
    assert!(matches!(e, MetadataError::InvalidLabel { .. }), "{e}");
    // Empty values are never stored, so they do not count.
    let empties: BTreeMap<String, String> = (0..2 * MAX_LABELS).map(|i| (format!("e{i}"), String::new())).collect();
    store.create("empties", None, Kind::Active, empties).unwrap();
}

#[test]
fn ids_are_unique_and_never_reused() {
    let (_dir, store) = open();
    let a = store.create("a", None, Kind::Active, no_labels()).unwrap();
    let b = store.create("b", None, Kind::Active, no_labels()).unwrap();
    assert_ne!(a.id, b.id);
    store.remove("b").unwrap();
    store.remove("a").unwrap();
    let c = store.create("a", None, Kind::Active, no_labels()).unwrap();
    assert!(c.id > b.id && c.id > a.id, "{c:?}");
    // A failed create does not consume or reuse an id.
    store.create("x", Some("missing"), Kind::Active, no_labels()).unwrap_err();
    let d = store.create("d", None, Kind::Active, no_labels()).unwrap();
    assert_eq!(d.id, c.id + 1);
}

#[test]
fn commit_moves_record_and_keeps_links() {
    let (_dir, store) = open();
    let base = committed(&store, "base", None);
    let active = store.create("extract 1", Some("base"), Kind::Active, labels(&[("own", "1")])).unwrap();

    let layer = store.commit("layer", "extract 1", no_labels(), USAGE).unwrap();
    assert_eq!(layer.id, active.id);
    assert_eq!(layer.key, "layer");
    assert_eq!(layer.parent.as_deref(), Some("base"));
    assert_eq!(layer.kind, Kind::Committed);
    assert_eq!(layer.usage, Some(USAGE));
    assert_eq!(layer.labels, labels(&[("own", "1")]), "empty labels keep the snapshot's own");
    assert_eq!(layer.created, active.created);
    assert!(layer.updated >= active.updated);
    assert_eq!(store.get("extract 1").unwrap(), None);
    assert_eq!(store.get("layer").unwrap(), Some(layer.clone()));

    // The parent's child link follows the rename.
    assert!(matches!(store.remove("base"), Err(MetadataError::HasChildren { .. })));
    let child = store.create("rootfs", Some("layer"), Kind::Active, no_labels()).unwrap();
    assert_eq!(store.ancestors("rootfs").unwrap(), vec![layer.clone(), base]);
    assert!(store.has_children("layer").unwrap());

    // Removing the chain from the top down unlinks each step.
    store.remove(&child.key).unwrap();
    store.remove("layer").unwrap();
    assert!(!store.has_children("base").unwrap());
    store.remove("base").unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn commit_labels_replace_own_labels() {
    let (_dir, store) = open();
    store.create("a", None, Kind::Active, labels(&[("own", "1"), ("keep", "2")])).unwrap();
    let record = store.commit("c", "a", labels(&[("new", "3")]), USAGE).unwrap();
    assert_eq!(record.labels, labels(&[("new", "3")]));
}

#[test]
fn remove_refuses_parents_until_children_are_gone() {
    let (_dir, store) = open();
    committed(&store, "p", None);
    store.create("c1", Some("p"), Kind::View, no_labels()).unwrap();
    store.create("c2", Some("p"), Kind::Active, no_labels()).unwrap();

    let err = store.remove("p").unwrap_err();
    assert!(matches!(&err, MetadataError::HasChildren { key } if key == "p"));
    assert!(err.to_string().contains("has children"), "{err}");
    store.remove("c1").unwrap();
    assert!(matches!(store.remove("p"), Err(MetadataError::HasChildren { .. })));
    let removed = store.remove("c2").unwrap();
    assert_eq!(removed.key, "c2");
    let removed = store.remove("p").unwrap();
    assert_eq!(removed.key, "p");
    assert_eq!(store.get("p").unwrap(), None);
}

#[test]
fn update_labels_path_forms() {
    let (_dir, store) = open();
    let created = store.create("a", None, Kind::Active, labels(&[("x", "1"), ("y", "2")])).unwrap();

    // No paths: replace everything.
    let r = store.update_labels("a", labels(&[("z", "3")]), &[]).unwrap();
    assert_eq!(r.labels, labels(&[("z", "3")]));
    assert!(r.updated >= created.updated);
    assert_eq!(r.created, created.created);

    // "labels": replace everything.
    let r = store.update_labels("a", labels(&[("x", "1"), ("y", "2")]), &["labels".to_owned()]).unwrap();
    assert_eq!(r.labels, labels(&[("x", "1"), ("y", "2")]));

    // "labels.<k>": set one; keys may contain dots.
    let key = "containerd.io/snapshot.ref";
    let r =
        store.update_labels("a", labels(&[(key, "sha256:1"), ("y", "ignored")]), &[format!("labels.{key}")]).unwrap();
    assert_eq!(r.labels, labels(&[("x", "1"), ("y", "2"), (key, "sha256:1")]));

    // "labels.<k>" absent from the given labels (or empty): delete it.
    let r = store.update_labels("a", labels(&[("y", "")]), &["labels.x".to_owned(), "labels.y".to_owned()]).unwrap();
    assert_eq!(r.labels, labels(&[(key, "sha256:1")]));
    assert_eq!(store.get("a").unwrap(), Some(r.clone()));

    // Any other path is refused, and nothing changes.
    for path in ["name", "labels.", "parent", "labelsx"] {
        let err = store.update_labels("a", no_labels(), &[path.to_owned()]).unwrap_err();
        assert!(matches!(&err, MetadataError::InvalidField { path: p } if p == path), "{err}");
    }
    let err = store.update_labels("a", no_labels(), &["labels.x".to_owned(), "kind".to_owned()]).unwrap_err();
    assert!(matches!(err, MetadataError::InvalidField { .. }));
    assert_eq!(store.get("a").unwrap(), Some(r));
}

#[test]
fn ancestors_are_nearest_first() {
    let (_dir, store) = open();
    let l1 = committed(&store, "l1", None);
    let l2 = committed(&store, "l2", Some("l1"));
    let l3 = committed(&store, "l3", Some("l2"));
    store.create("top", Some("l3"), Kind::View, no_labels()).unwrap();
    assert_eq!(store.ancestors("top").unwrap(), vec![l3.clone(), l2.clone(), l1.clone()]);
    assert_eq!(store.ancestors("l3").unwrap(), vec![l2, l1]);
    assert!(store.ancestors("l1").unwrap().is_empty());
}

#[test]
fn list_is_ordered_by_key() {
    let (_dir, store) = open();
    for key in ["c", "a", "b"] {
        store.create(key, None, Kind::Active, no_labels()).unwrap();
    }
    let keys: Vec<String> = store.list().unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, ["a", "b", "c"]);
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.redb");
    let (before, last_id) = {
        let store = MetaStore::open(&path).unwrap();
        committed(&store, "base", None);
        store.create_committed("model", Some("base"), labels(&[("a", "b")]), Some("{}".to_owned()), USAGE).unwrap();
        let last = store.create("rootfs", Some("model"), Kind::Active, no_labels()).unwrap();
        let gone = store.create("gone", None, Kind::View, no_labels()).unwrap();
        store.remove("gone").unwrap();
        assert!(gone.id > last.id);
        (store.list().unwrap(), gone.id)
    };
    let store = MetaStore::open(&path).unwrap();
    assert_eq!(store.list().unwrap(), before);
    assert!(store.has_children("model").unwrap());
    assert_eq!(store.ancestors("rootfs").unwrap().len(), 2);
    let next = store.create("new", None, Kind::Active, no_labels()).unwrap();
    assert_eq!(next.id, last_id + 1, "the counter survives, including ids of removed snapshots");
}

#[test]
fn concurrent_creates_get_distinct_ids() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 25;
    let (_dir, store) = open();
    let store = Arc::new(store);
    committed(&store, "base", None);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                (0..PER_THREAD)
                    .map(|i| store.create(&format!("t{t}-{i}"), Some("base"), Kind::Active, no_labels()).unwrap().id)
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let ids: HashSet<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert_eq!(ids.len(), THREADS * PER_THREAD);
    assert_eq!(store.list().unwrap().len(), THREADS * PER_THREAD + 1);
}

#[test]
fn second_open_of_the_same_file_is_a_store_error() {
    let (dir, _store) = open();
    let err = MetaStore::open(&dir.path().join("metadata.redb")).unwrap_err();
    assert!(matches!(&err, MetadataError::Store { context, .. } if context.starts_with("open ")), "{err}");
}

#[test]
fn missing_directory_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent/metadata.redb");
    let err = MetaStore::open(&path).unwrap_err();
    assert!(matches!(err, MetadataError::Private { .. }), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[test]
fn undecodable_record_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.redb");
    drop(MetaStore::open(&path).unwrap());
    write_raw(&path, "bad", b"not json");
    let store = MetaStore::open(&path).unwrap();
    assert!(matches!(store.get("bad"), Err(MetadataError::Corrupt { key, .. }) if key == "bad"));
    assert!(matches!(store.list(), Err(MetadataError::Corrupt { .. })));
    assert!(matches!(store.remove("bad"), Err(MetadataError::Corrupt { .. })));
}

#[test]
fn record_under_the_wrong_key_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.redb");
    let bytes = {
        let store = MetaStore::open(&path).unwrap();
        encode(&store.create("a", None, Kind::Active, no_labels()).unwrap()).unwrap()
    };
    write_raw(&path, "b", &bytes);
    let store = MetaStore::open(&path).unwrap();
    assert!(matches!(store.get("b"), Err(MetadataError::Corrupt { key, .. }) if key == "b"));
}

#[test]
fn looping_or_broken_parent_chain_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.redb");
    let (mut a, mut b) = {
        let store = MetaStore::open(&path).unwrap();
        (committed(&store, "a", None), committed(&store, "b", None))
    };
    a.parent = Some("b".to_owned());
    b.parent = Some("a".to_owned());
    write_raw(&path, "a", &encode(&a).unwrap());
    write_raw(&path, "b", &encode(&b).unwrap());
    {
        let store = MetaStore::open(&path).unwrap();
        let err = store.ancestors("a").unwrap_err();
        assert!(matches!(&err, MetadataError::Corrupt { reason, .. } if reason.contains("loops")), "{err}");
    }
    b.parent = Some("gone".to_owned());
    write_raw(&path, "b", &encode(&b).unwrap());
    let store = MetaStore::open(&path).unwrap();
    let err = store.ancestors("a").unwrap_err();
    assert!(matches!(&err, MetadataError::Corrupt { key, reason } if key == "b" && reason.contains("gone")), "{err}");
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.redb");
    drop(MetaStore::open(&path).unwrap());
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(INFO).unwrap().insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION + 1).unwrap();
        txn.commit().unwrap();
    }
    let err = MetaStore::open(&path).unwrap_err();
    assert!(matches!(&err, MetadataError::UnsupportedSchema { found, .. } if *found == SCHEMA_VERSION + 1), "{err}");
}

#[test]
fn timestamp_before_1970_is_an_encode_error() {
    let (_dir, store) = open();
    let mut record = store.create("a", None, Kind::Active, no_labels()).unwrap();
    record.created = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
    assert!(matches!(encode(&record), Err(MetadataError::Encode { key, .. }) if key == "a"));
}

#[test]
fn kind_names_match_containerd() {
    assert_eq!([Kind::View, Kind::Active, Kind::Committed].map(Kind::as_str), ["view", "active", "committed"]);
}

#[test]
fn the_file_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.redb");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    drop(MetaStore::open(&path).unwrap());
    assert_eq!(mode(&path), FILE_MODE);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = MetaStore::open(&path).unwrap();
    assert_eq!(mode(&path), FILE_MODE, "an existing file is tightened");
    store.create("a", None, Kind::Active, no_labels()).unwrap();
}
