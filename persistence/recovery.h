// Recovery's choice of snapshot, shared by the engine (Snapshotter::load_newest
// in snapshotter.cc) and jobsnap (snapshot_tools.cc), so that the tool shows
// and edits exactly what the next engine start would load.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/persistence_hooks.h"
#include "jobengine/engine.h"
#include "jobengine/status.h"
#include "persistence/file_store.h"
#include "persistence/file_system.h"

namespace jobengine::persist {

// The shared-memory candidate as its reader got it: the active image, or why
// there is none (kNotFound: no segment or no image yet, not reported).
struct ShmCandidate {
  std::string source;  // "shm:<name>"
  Result<std::vector<unsigned char>> image;
};

// Takes the candidate with the highest generation that verifies, from the
// segment (`shm`, may be null) and the directory's generation files (`files`,
// as list_generations() gives them), reading files through `fs`. On a tie the
// shared-memory copy wins. A file whose header generation differs from its
// name is skipped. The segment's image is moved out of `shm`. Fills report.recovered/source/generation/taken_at/why and
// report.skipped (every newer candidate that did not verify: source, byte
// offset, reason). Returns the loaded image, or nullptr when none verified.
// Logs nothing and modifies nothing.
//
// Files are read (FileStore::read), or mapped (FileStore::map) when
// `map_files`: only for a caller holding the directory's lock (the engine), so
// that no publish can recycle, and truncate, a file while it is mapped (a
// tool that mapped one would die of SIGBUS). A file that vanished or was
// recycled between the listing and the read is passed over like a pruned one
// (counted in *gone when given: a caller without the lock lists again).
//
// Only a candidate that is damaged (kCorruption) or refused as input
// (kInvalidArgument: a symlink, a FIFO, a file over the limit) is passed over.
// One that could not be read for any other reason (kIoError: open failing
// with EMFILE/ENFILE/EACCES, mmap with ENOMEM or EIO, a read's EIO or ESTALE,
// EINTR past the retry limit, the segment's copy out of memory;
// kFailedPrecondition: a segment rewritten during every copy) says nothing of
// its image, which may be the newest: taking an older one would let the next
// publishes overwrite it. Recovery stops there and returns nullptr, with the
// candidate last in report.skipped and report.why saying why, what to do
// (retry; move the file aside, or remove the segment, if truly unreadable),
// and the same text, with the read's code, in *error when given (the
// engine's open() returns it). jobsnap, which passes no `error`, so reports
// it rather than show an older generation as the one an engine would load.
std::unique_ptr<detail::LoadedSnapshot> load_newest(ShmCandidate* shm,
                                                    std::span<const GenerationFile> files,
                                                    FileSystem& fs, RecoveryReport& report,
                                                    bool map_files = false,
                                                    std::size_t* gone = nullptr,
                                                    Status* error = nullptr);

// The largest file recovery reads (larger ones are skipped as refused).
inline constexpr std::uint64_t kMaxSnapshotFileBytes = std::uint64_t{1} << 38;  // 256 GiB

}  // namespace jobengine::persist
