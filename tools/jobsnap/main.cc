// jobsnap: the operator's tool for jobengine snapshots. A thin main over
// jobengine/snapshot_tools.h: it parses the command line (CLI11), calls one
// library function, prints its result (text, or JSON with --json) and maps
// failure classes to exit codes. The manual is tools/jobsnap.md.
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <exception>
#include <iostream>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "jobengine/snapshot_format.h"
#include "jobengine/snapshot_tools.h"

namespace {

namespace st = jobengine::snapshot_tools;
namespace snap = jobengine::snapshot;
using json = nlohmann::json;

// Exit codes (tools/jobsnap.md, "Exit status").
constexpr int kExitOk = 0;
constexpr int kExitDiffers = 1;
constexpr int kExitCorrupt = 2;
constexpr int kExitTruncated = 3;
constexpr int kExitUnsupportedVersion = 4;
constexpr int kExitNotFound = 5;
constexpr int kExitRefusedInput = 6;
constexpr int kExitLocked = 7;
constexpr int kExitRefused = 8;
constexpr int kExitUsage = 64;     // EX_USAGE
constexpr int kExitInternal = 70;  // EX_SOFTWARE
constexpr int kExitIoError = 74;   // EX_IOERR

int exit_code(st::Failure f) {
  switch (f) {
    case st::Failure::kNone: return kExitOk;
    case st::Failure::kCorrupt: return kExitCorrupt;
    case st::Failure::kTruncated: return kExitTruncated;
    case st::Failure::kUnsupportedVersion: return kExitUnsupportedVersion;
    case st::Failure::kNotFound: return kExitNotFound;
    case st::Failure::kRefusedInput: return kExitRefusedInput;
    case st::Failure::kLocked: return kExitLocked;
    case st::Failure::kRefused: return kExitRefused;
    case st::Failure::kIoError: return kExitIoError;
    case st::Failure::kUsage: return kExitUsage;
  }
  return kExitInternal;
}

// ------------------------------------------------------------ formatting

// "2026-11-28T00:52:31.123456789Z".
std::string iso_time(std::int64_t ns) {
  std::int64_t secs = ns / 1000000000;
  std::int64_t frac = ns % 1000000000;
  if (frac < 0) {
    frac += 1000000000;
    --secs;
  }
  const auto t = static_cast<std::time_t>(secs);
  std::tm tm{};
  if (gmtime_r(&t, &tm) == nullptr) return std::to_string(ns) + "ns";
  char date[40];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[64];
  std::snprintf(out, sizeof out, "%s.%09lldZ", date, static_cast<long long>(frac));
  return out;
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// "3h 2m", "41s", "120ms": a duration.
std::string duration(std::uint64_t ns) {
  const std::uint64_t s = ns / 1000000000;
  if (s == 0) return std::to_string(ns / 1000000) + "ms";
  if (s < 60) return std::to_string(s) + "s";
  if (s < 3600) return std::to_string(s / 60) + "m " + std::to_string(s % 60) + "s";
  if (s < 86400) return std::to_string(s / 3600) + "h " + std::to_string(s % 3600 / 60) + "m";
  return std::to_string(s / 86400) + "d " + std::to_string(s % 86400 / 3600) + "h";
}

// |a - b| without overflow: times come from the image, any int64 value, and
// their difference needs 65 bits. It fits a uint64 (at most 2^64 - 1), and
// unsigned subtraction of the larger from the smaller gives it exactly.
std::uint64_t distance(std::int64_t a, std::int64_t b) {
  return a >= b ? static_cast<std::uint64_t>(a) - static_cast<std::uint64_t>(b)
                : static_cast<std::uint64_t>(b) - static_cast<std::uint64_t>(a);
}

// "3h 2m ago", or "in the future" for a time after `now` (a clock set back,
// or a hand-made image).
std::string ago(std::int64_t then, std::int64_t now) {
  if (then > now) return "in the future";
  return duration(distance(now, then)) + " ago";
}

// The length of the valid UTF-8 sequence at s[i] (1..4, its code point in
// *cp), or 0 where there is none: a stray or bad byte, a sequence cut
// short, an overlong form, a surrogate, past U+10FFFF.
std::size_t utf8_at(std::string_view s, std::size_t i, std::uint32_t* cp) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  std::size_t n = 0;
  std::uint32_t v = 0;
  if ((c & 0xe0) == 0xc0) {
    n = 1;
    v = c & 0x1fu;
  } else if ((c & 0xf0) == 0xe0) {
    n = 2;
    v = c & 0x0fu;
  } else if ((c & 0xf8) == 0xf0) {
    n = 3;
    v = c & 0x07u;
  } else {
    return 0;
  }
  if (i + n >= s.size()) return 0;
  for (std::size_t k = 1; k <= n; ++k) {
    const auto cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xc0) != 0x80) return 0;
    v = (v << 6) | (cc & 0x3fu);
  }
  if ((n == 1 && v < 0x80) || (n == 2 && v < 0x800) || (n == 3 && v < 0x10000) ||
      (v >= 0xd800 && v <= 0xdfff) || v > 0x10ffff) {
    return 0;
  }
  *cp = v;
  return n + 1;
}

// C0 controls, DEL and C1 controls (U+0080..U+009F).
bool is_control(std::uint32_t cp) { return cp < 0x20 || (cp >= 0x7f && cp < 0xa0); }

// Valid UTF-8 without control characters other than tab, CR and LF.
bool printable(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    std::uint32_t cp = 0;
    const std::size_t n = utf8_at(s, i, &cp);
    if (n == 0 || (is_control(cp) && cp != '\t' && cp != '\n' && cp != '\r')) return false;
    i += n;
  }
  return true;
}

// Text from an image (a handler name, a job's last error) as text output
// shows it. An image is input, possibly crafted: printed raw, an ESC [ ...
// sequence would drive the terminal (move the cursor, rewrite what is on
// screen, set its title) and a newline would fake a line of output (a dead
// job that is not there). Valid UTF-8 is kept, except: tab, LF and CR as
// \t, \n, \r; other C0 controls, DEL and bytes that are not UTF-8 as \xNN;
// C1 controls, the line and paragraph separators and the bidirectional
// overrides and isolates (which reorder what a terminal shows) as \uNNNN;
// a backslash as \\, so that every escape reads one way. JSON output has
// JSON's own escapes instead.
std::string shown(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  char buf[16];
  for (std::size_t i = 0; i < s.size();) {
    std::uint32_t cp = 0;
    const std::size_t n = utf8_at(s, i, &cp);
    if (n == 0) {
      std::snprintf(buf, sizeof buf, "\\x%02x",
                    static_cast<unsigned>(static_cast<unsigned char>(s[i])));
      out += buf;
      i += 1;
      continue;
    }
    const bool reorders = cp == 0x2028 || cp == 0x2029 || (cp >= 0x202a && cp <= 0x202e) ||
                          (cp >= 0x2066 && cp <= 0x2069) || cp == 0x200e || cp == 0x200f ||
                          cp == 0x061c;
    if (cp == '\\') {
      out += "\\\\";
    } else if (cp == '\t') {
      out += "\\t";
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp < 0x80 && is_control(cp)) {
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(cp));
      out += buf;
    } else if (is_control(cp) || reorders) {
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(cp));
      out += buf;
    } else {
      out.append(s.substr(i, n));
    }
    i += n;
  }
  return out;
}

std::string base64(std::string_view in) {
  static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const std::uint32_t v = static_cast<std::uint32_t>(static_cast<unsigned char>(in[i])) << 16 |
                            static_cast<std::uint32_t>(static_cast<unsigned char>(in[i + 1])) << 8 |
                            static_cast<unsigned char>(in[i + 2]);
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += t[(v >> 6) & 63];
    out += t[v & 63];
  }
  if (i < in.size()) {
    std::uint32_t v = static_cast<std::uint32_t>(static_cast<unsigned char>(in[i])) << 16;
    if (i + 1 < in.size()) v |= static_cast<std::uint32_t>(static_cast<unsigned char>(in[i + 1])) << 8;
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += i + 1 < in.size() ? t[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

// Text when printable, else base64; `field` + "_encoding" says which.
void put_bytes(json& j, const std::string& field, std::string_view bytes) {
  if (printable(bytes)) {
    j[field] = std::string(bytes);
    j[field + "_encoding"] = "text";
  } else {
    j[field] = base64(bytes);
    j[field + "_encoding"] = "base64";
  }
}

// A name or message that should be text; invalid bytes are replaced on output.
std::string text(std::string_view s) { return std::string(s); }

std::string dump_json(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
std::string dump_pretty(const json& j) { return j.dump(2, ' ', false, json::error_handler_t::replace); }

json job_json(const snap::SnapshotView& v, const snap::JobRecordView& j) {
  json o;
  o["id"] = j.id;
  o["handler"] = text(v.handlers[j.handler]);
  o["priority"] = j.priority;
  o["state"] = std::string(snap::job_state_name(j.state));
  o["attempts"] = j.attempts;
  o["recoveries"] = j.recoveries;
  o["submit_time"] = iso_time(j.submit_ns);
  o["submit_ns"] = j.submit_ns;
  o["run_at"] = iso_time(j.run_at_ns);
  o["run_at_ns"] = j.run_at_ns;
  o["dead_reason"] = std::string(snap::dead_reason_name(j.dead_reason));
  if (j.dead_at_ns != 0) {
    o["dead_at"] = iso_time(j.dead_at_ns);
    o["dead_at_ns"] = j.dead_at_ns;
  }
  o["error"] = text(j.error);
  put_bytes(o, "key", j.key);
  o["deadline_ns"] = j.deadline_ns;
  o["cancel_requested"] = j.cancel_requested;
  o["payload_bytes"] = j.payload.size();
  put_bytes(o, "payload", j.payload);
  return o;
}

json header_json(const st::Image& image) {
  const snap::Header& h = image.view.header;
  return json{{"source", image.source},
              {"format_version", h.format_version},
              {"generation", h.generation},
              {"cut_epoch", h.cut_epoch},
              {"time", iso_time(h.wall_time_ns)},
              {"wall_time_ns", h.wall_time_ns},
              {"next_job_id", h.next_job_id},
              {"handler_count", h.handler_count},
              {"job_count", h.job_count},
              {"bytes", image.bytes.size()},
              {"image_checksum", image.view.image_checksum}};
}

json counts_json(const st::StateCounts& c) {
  json o;
  o["total"] = c.total;
  for (int s = 1; s <= 5; ++s) {
    o[std::string(snap::job_state_name(static_cast<snap::JobState>(s)))] = c.by_state[s];
  }
  return o;
}

// ------------------------------------------------------------ errors

struct Options {
  bool json = false;
};

// "<class>: <message>", unless the message starts with its class already (the
// decoder's "corrupt at offset N: ..." does).
std::string describe(st::Failure f, const std::string& message) {
  const std::string_view name = st::failure_name(f);
  if (message.rfind(name, 0) == 0) return message;
  return std::string(name) + ": " + message;
}

// The documented error object, on stdout (for --json).
void print_json_error(st::Failure f, const std::string& msg, const st::Diagnosis& d) {
  json e{{"error", {{"class", std::string(st::failure_name(f))}, {"exit_code", exit_code(f)},
                    {"message", msg}}}};
  if (d.has_offset) e["error"]["offset"] = d.offset;
  // One line: a document to the commands that print one, and a line like
  // the others to dump's JSON lines.
  std::cout << dump_json(e) << "\n";
}

// Prints a failure (stderr; with --json also as an object on stdout) and
// returns its exit code.
int report_failure(const jobengine::Status& status, const st::Diagnosis& d, const Options& o) {
  const st::Failure f = d.failure == st::Failure::kNone ? st::Failure::kIoError : d.failure;
  std::string msg(status.message());
  std::cerr << "jobsnap: " << describe(f, msg) << "\n";
  if (o.json) print_json_error(f, msg, d);
  return exit_code(f);
}

// ------------------------------------------------------------ commands

int cmd_list(const std::string& dir, const std::string& shm, const Options& o) {
  st::Diagnosis d;
  auto gens = st::list(dir, shm, &d);
  if (!gens) return report_failure(gens.status(), d, o);
  if (o.json) {
    json arr = json::array();
    for (const auto& g : *gens) {
      json e{{"source", g.source}, {"shm", g.shm}, {"generation", g.generation},
             {"bytes", g.bytes}, {"valid", g.valid}, {"loaded_next", g.loaded_next}};
      if (g.valid) {
        e["time"] = iso_time(g.header.wall_time_ns);
        e["wall_time_ns"] = g.header.wall_time_ns;
        e["cut_epoch"] = g.header.cut_epoch;
        e["format_version"] = g.header.format_version;
        e["jobs"] = counts_json(g.counts);
      } else {
        e["failure"] = std::string(st::failure_name(g.diagnosis.failure));
        e["exit_code"] = exit_code(g.diagnosis.failure);
        if (g.diagnosis.has_offset) e["offset"] = g.diagnosis.offset;
        e["reason"] = g.reason;
      }
      arr.push_back(std::move(e));
    }
    std::cout << dump_pretty(arr) << "\n";
    return kExitOk;
  }
  if (gens->empty()) {
    std::cout << "no generations in " << dir << "\n";
    return kExitOk;
  }
  std::printf("%-3s %10s  %-30s %8s %8s %8s %8s %8s %8s %8s %12s  %s\n", "", "GENERATION",
              "TIME (UTC)", "CUT", "JOBS", "PENDING", "RUNNING", "DELAYED", "RETRY", "DEAD",
              "BYTES", "STATUS / SOURCE");
  for (const auto& g : *gens) {
    const std::string where = g.shm ? g.source : g.source.substr(g.source.rfind('/') + 1);
    const char* mark = g.loaded_next ? "=>" : "";
    if (g.valid) {
      const st::StateCounts& c = g.counts;
      std::printf("%-3s %10llu  %-30s %8llu %8llu %8llu %8llu %8llu %8llu %8llu %12llu  %s %s%s\n",
                  mark, static_cast<unsigned long long>(g.generation),
                  iso_time(g.header.wall_time_ns).c_str(),
                  static_cast<unsigned long long>(g.header.cut_epoch),
                  static_cast<unsigned long long>(c.total),
                  static_cast<unsigned long long>(c.of(snap::JobState::kPending)),
                  static_cast<unsigned long long>(c.of(snap::JobState::kRunningAtCut)),
                  static_cast<unsigned long long>(c.of(snap::JobState::kDelayed)),
                  static_cast<unsigned long long>(c.of(snap::JobState::kWaitingRetry)),
                  static_cast<unsigned long long>(c.of(snap::JobState::kDead)),
                  static_cast<unsigned long long>(g.bytes), "valid", where.c_str(),
                  g.loaded_next ? "  (the next engine start loads this)" : "");
    } else {
      const std::string why = describe(g.diagnosis.failure, g.reason);
      std::printf("%-3s %10llu  %-30s %8s %8s %8s %8s %8s %8s %8s %12llu  %s %s: %s\n", mark,
                  static_cast<unsigned long long>(g.generation), "-", "-", "-", "-", "-", "-", "-",
                  "-", static_cast<unsigned long long>(g.bytes), "INVALID", where.c_str(),
                  why.c_str());
    }
  }
  return kExitOk;
}

int cmd_inspect(const st::Source& src, const Options& o) {
  st::Diagnosis d;
  auto image = st::load(src, &d);
  if (!image) return report_failure(image.status(), d, o);
  const snap::SnapshotView& v = image->view;
  const st::Summary s = st::summarize(v);
  const std::int64_t now = now_ns();
  if (o.json) {
    json j;
    j["header"] = header_json(*image);
    j["jobs"] = counts_json(s.counts);
    json handlers = json::array();
    for (const auto& h : s.by_handler) {
      handlers.push_back({{"handler", text(h.name)}, {"jobs", h.jobs}, {"dead", h.dead}});
    }
    j["by_handler"] = handlers;
    j["by_priority"] = json::array({s.by_priority[0], s.by_priority[1], s.by_priority[2]});
    j["oldest_live_job"] = s.oldest_live ? job_json(v, *s.oldest_live) : json(nullptr);
    json dead = json::array();
    for (const auto* job : s.dead) dead.push_back(job_json(v, *job));
    j["dead_jobs"] = dead;
    std::cout << dump_pretty(j) << "\n";
    return kExitOk;
  }
  const snap::Header& h = v.header;
  std::printf("source          %s\n", image->source.c_str());
  std::printf("format version  %u\n", static_cast<unsigned>(h.format_version));
  std::printf("generation      %llu\n", static_cast<unsigned long long>(h.generation));
  std::printf("cut epoch       %llu\n", static_cast<unsigned long long>(h.cut_epoch));
  std::printf("taken at        %s (%s)\n", iso_time(h.wall_time_ns).c_str(),
              ago(h.wall_time_ns, now).c_str());
  std::printf("next job id     %llu\n", static_cast<unsigned long long>(h.next_job_id));
  std::printf("bytes           %zu (image checksum 0x%016llx, verified)\n", image->bytes.size(),
              static_cast<unsigned long long>(v.image_checksum));
  std::printf("jobs            %llu\n", static_cast<unsigned long long>(s.counts.total));
  std::printf("\nby state\n");
  for (int i = 1; i <= 5; ++i) {
    std::printf("  %-16s %llu\n",
                std::string(snap::job_state_name(static_cast<snap::JobState>(i))).c_str(),
                static_cast<unsigned long long>(s.counts.by_state[i]));
  }
  std::printf("\nby priority\n");
  static const char* kPrio[] = {"0 (high)", "1 (normal)", "2 (low)"};
  for (int p = 0; p < 3; ++p) {
    std::printf("  %-16s %llu\n", kPrio[p], static_cast<unsigned long long>(s.by_priority[p]));
  }
  std::printf("\nby handler (%zu)\n", s.by_handler.size());
  for (const auto& hc : s.by_handler) {
    std::printf("  %-30s %llu jobs, %llu dead\n", shown(hc.name).c_str(),
                static_cast<unsigned long long>(hc.jobs), static_cast<unsigned long long>(hc.dead));
  }
  std::printf("\noldest live job\n");
  if (s.oldest_live == nullptr) {
    std::printf("  none\n");
  } else {
    const auto& j = *s.oldest_live;
    std::printf("  id %llu  %s  %s  priority %u  attempts %u  submitted %s (%s %s the cut)\n",
                static_cast<unsigned long long>(j.id), shown(v.handlers[j.handler]).c_str(),
                std::string(snap::job_state_name(j.state)).c_str(),
                static_cast<unsigned>(j.priority), static_cast<unsigned>(j.attempts),
                iso_time(j.submit_ns).c_str(),
                duration(distance(h.wall_time_ns, j.submit_ns)).c_str(),
                j.submit_ns > h.wall_time_ns ? "after" : "before");
  }
  std::printf("\ndead / quarantined jobs (%zu)\n", s.dead.size());
  for (const auto* jp : s.dead) {
    const auto& j = *jp;
    std::printf("  id %llu  %s  reason %s  recoveries %u  attempts %u  died %s\n",
                static_cast<unsigned long long>(j.id), shown(v.handlers[j.handler]).c_str(),
                std::string(snap::dead_reason_name(j.dead_reason)).c_str(),
                static_cast<unsigned>(j.recoveries), static_cast<unsigned>(j.attempts),
                j.dead_at_ns == 0 ? "-" : iso_time(j.dead_at_ns).c_str());
    if (!j.error.empty()) std::printf("      error: %s\n", shown(j.error).c_str());
  }
  return kExitOk;
}

struct DumpFilter {
  std::vector<std::string> handlers;
  std::vector<std::string> states;
  std::vector<std::uint64_t> ids;
};

int cmd_dump(const st::Source& src, const DumpFilter& f, const Options& o) {
  st::Diagnosis d;
  auto image = st::load(src, &d);
  if (!image) return report_failure(image.status(), d, o);
  const snap::SnapshotView& v = image->view;
  const std::set<std::string> handlers(f.handlers.begin(), f.handlers.end());
  const std::set<std::string> states(f.states.begin(), f.states.end());
  const std::set<std::uint64_t> ids(f.ids.begin(), f.ids.end());
  for (const auto& j : v.jobs) {
    if (!handlers.empty() && handlers.count(std::string(v.handlers[j.handler])) == 0) continue;
    if (!states.empty() && states.count(std::string(snap::job_state_name(j.state))) == 0) continue;
    if (!ids.empty() && ids.count(j.id) == 0) continue;
    std::cout << dump_json(job_json(v, j)) << "\n";
  }
  return kExitOk;
}

int cmd_verify(const st::Source& src, const Options& o) {
  // One image (a file, a generation, a segment), or every image of a
  // directory (and the segment): the first failure decides the exit code.
  std::vector<st::GenerationInfo> results;
  st::Diagnosis d;
  const bool whole_dir = !src.path.empty() && !src.generation && [&] {
    struct stat sb;
    return ::lstat(src.path.c_str(), &sb) == 0 && S_ISDIR(sb.st_mode);
  }();
  if (whole_dir) {
    auto gens = st::list(src.path, src.shm, &d);
    if (!gens) return report_failure(gens.status(), d, o);
    if (gens->empty()) {
      return report_failure(jobengine::Status(jobengine::StatusCode::kNotFound,
                                              "no generations in " + src.path),
                            st::Diagnosis{st::Failure::kNotFound, false, 0}, o);
    }
    results = std::move(*gens);
  } else {
    auto image = st::load(src, &d);
    if (!image && d.failure != st::Failure::kCorrupt && d.failure != st::Failure::kTruncated &&
        d.failure != st::Failure::kUnsupportedVersion) {
      return report_failure(image.status(), d, o);  // not an image problem: nothing verified
    }
    st::GenerationInfo g;
    g.source = image ? image->source : (src.path.empty() ? "shm:" + src.shm : src.path);
    // A generation file given as FILE (e.g. one kept aside) is checked as
    // `verify DIR` checks it: its header must agree with its name, or the
    // engine would pass it over in a directory.
    const bool plain_file = !src.path.empty() && src.shm.empty() && !src.generation;
    if (image && plain_file) {
      if (jobengine::Status s = st::check_file_name(src.path, image->view.header, &d); !s.ok()) {
        g.generation = st::generation_of_name(src.path).value_or(0);
        image = s;
      }
    }
    if (image) {
      g.valid = true;
      g.generation = image->view.header.generation;
      g.bytes = image->bytes.size();
      g.header = image->view.header;
      g.counts = st::count_states(image->view);
    } else {
      g.diagnosis = d;
      g.reason = std::string(image.status().message());
    }
    results.push_back(std::move(g));
  }
  int code = kExitOk;
  for (const auto& g : results) {
    if (!g.valid && code == kExitOk) code = exit_code(g.diagnosis.failure);
  }
  if (o.json) {
    json arr = json::array();
    for (const auto& g : results) {
      json e{{"source", g.source}, {"generation", g.generation}, {"valid", g.valid}};
      if (g.valid) {
        e["jobs"] = g.counts.total;
        e["bytes"] = g.bytes;
      } else {
        e["failure"] = std::string(st::failure_name(g.diagnosis.failure));
        e["exit_code"] = exit_code(g.diagnosis.failure);
        if (g.diagnosis.has_offset) e["offset"] = g.diagnosis.offset;
        e["reason"] = g.reason;
      }
      arr.push_back(std::move(e));
    }
    std::cout << dump_pretty(json{{"sound", code == kExitOk}, {"exit_code", code}, {"images", arr}})
              << "\n";
    return code;
  }
  for (const auto& g : results) {
    if (g.valid) {
      std::printf("ok       %s: generation %llu, %llu jobs, %llu bytes; header, every record and "
                  "the image checksum verified\n",
                  g.source.c_str(), static_cast<unsigned long long>(g.generation),
                  static_cast<unsigned long long>(g.counts.total),
                  static_cast<unsigned long long>(g.bytes));
    } else {
      std::printf("FAILED   %s: %s\n", g.source.c_str(),
                  describe(g.diagnosis.failure, g.reason).c_str());
    }
  }
  std::printf("%s\n", code == kExitOk ? "sound" : "NOT sound");
  return code;
}

st::Source parse_source_spec(const std::string& spec) {
  st::Source s;
  if (spec.rfind("shm:", 0) == 0) {
    s.shm = spec.substr(4);
  } else {
    s.path = spec;
  }
  return s;
}

// The status with " (in SPEC)" added: which of two sources failed.
jobengine::Status in_source(const jobengine::Status& s, const std::string& spec) {
  return jobengine::Status(s.code(), std::string(s.message()) + " (in " + spec + ")");
}

int cmd_diff(const std::string& a_spec, const std::string& b_spec, const Options& o) {
  st::Diagnosis d;
  auto a = st::load(parse_source_spec(a_spec), &d);
  if (!a) return report_failure(in_source(a.status(), a_spec), d, o);
  auto b = st::load(parse_source_spec(b_spec), &d);
  if (!b) return report_failure(in_source(b.status(), b_spec), d, o);
  const st::Diff diff = st::diff(a->view, b->view);
  if (o.json) {
    json changed = json::array();
    for (const auto& c : diff.changed) changed.push_back({{"id", c.id}, {"fields", c.fields}});
    std::cout << dump_pretty(json{{"a", {{"source", a->source}, {"generation", a->view.header.generation}}},
                                  {"b", {{"source", b->source}, {"generation", b->view.header.generation}}},
                                  {"same", diff.empty()},
                                  {"added", diff.added},
                                  {"removed", diff.removed},
                                  {"changed", changed}})
              << "\n";
    return diff.empty() ? kExitOk : kExitDiffers;
  }
  std::printf("a: %s (generation %llu, %zu jobs)\n", a->source.c_str(),
              static_cast<unsigned long long>(a->view.header.generation), a->view.jobs.size());
  std::printf("b: %s (generation %llu, %zu jobs)\n", b->source.c_str(),
              static_cast<unsigned long long>(b->view.header.generation), b->view.jobs.size());
  auto ids = [](const std::vector<jobengine::JobId>& v) {
    std::string out;
    for (auto id : v) {
      out += ' ';
      out += std::to_string(id);
    }
    return out;
  };
  std::printf("added   %zu:%s\n", diff.added.size(), ids(diff.added).c_str());
  std::printf("removed %zu:%s\n", diff.removed.size(), ids(diff.removed).c_str());
  std::printf("changed %zu\n", diff.changed.size());
  for (const auto& c : diff.changed) {
    std::string fields;
    for (const auto& f : c.fields) {
      if (!fields.empty()) fields += ", ";
      fields += f;
    }
    std::printf("  %llu: %s\n", static_cast<unsigned long long>(c.id), fields.c_str());
  }
  std::printf("%s\n", diff.empty() ? "same jobs" : "different");
  return diff.empty() ? kExitOk : kExitDiffers;
}

// What a write command did, for finish_stdout() to say when its report does
// not reach stdout (empty: no write command succeeded).
std::string g_write_done;

int print_write(const st::WriteReport& r, const std::string& what, const Options& o,
                bool warn_shm) {
  g_write_done = what + ": generation " + std::to_string(r.generation) + " written" +
                 (r.path.empty() ? "" : " to " + r.path) +
                 (r.shm.empty() ? "" : std::string(r.path.empty() ? " to" : " and to") +
                                           " shm segment '" + r.shm + "'");
  if (o.json) {
    std::cout << dump_pretty(json{{"done", what},
                                  {"from_source", r.from_source},
                                  {"from_generation", r.from_generation},
                                  {"generation", r.generation},
                                  {"path", r.path},
                                  {"shm", r.shm},
                                  {"aside_dir", r.aside_dir},
                                  {"moved_aside", r.moved},
                                  {"shm_kept", r.shm_kept},
                                  {"shm_kept_generation", r.shm_kept_generation},
                                  {"jobs", r.jobs}})
              << "\n";
    return kExitOk;
  }
  std::printf("%s: generation %llu of %s written as generation %llu (%llu jobs)\n", what.c_str(),
              static_cast<unsigned long long>(r.from_generation), r.from_source.c_str(),
              static_cast<unsigned long long>(r.generation),
              static_cast<unsigned long long>(r.jobs));
  if (!r.path.empty()) std::printf("  written to %s\n", r.path.c_str());
  if (!r.shm.empty()) std::printf("  written to shm segment '%s'\n", r.shm.c_str());
  const bool kept_aside =
      !r.shm_kept.empty() && std::find(r.moved.begin(), r.moved.end(), r.shm_kept) != r.moved.end();
  if (!r.shm_kept.empty() && !kept_aside) {
    std::printf("  the image segment '%s' held (generation %llu) kept as %s\n", r.shm.c_str(),
                static_cast<unsigned long long>(r.shm_kept_generation), r.shm_kept.c_str());
  }
  if (!r.aside_dir.empty()) {
    std::printf("  kept aside in %s/ (the engine ignores them):\n",
                r.aside_dir.c_str());
    for (const auto& m : r.moved) {
      if (m == r.shm_kept) {
        std::printf("    %s  (the image segment '%s' held)\n", m.c_str(), r.shm.c_str());
      } else {
        std::printf("    %s\n", m.c_str());
      }
    }
  }
  std::printf("  the next engine start loads generation %llu\n",
              static_cast<unsigned long long>(r.generation));
  if (warn_shm) {
    std::printf("  note: if the engine also uses a shared-memory segment, run this again with "
                "--shm NAME: a newer image there would be loaded instead\n");
  }
  return kExitOk;
}

// ------------------------------------------------------------ main

int run(int argc, char** argv) {
  CLI::App app{"jobsnap: list, inspect, verify, dump, edit and restore jobengine snapshots.\n"
               "Manual: tools/jobsnap.md. Exit status: 0 ok, 1 diff found differences, 2 corrupt,\n"
               "3 truncated, 4 unsupported version, 5 not found, 6 refused input, 7 locked by an\n"
               "engine, 8 refused operation, 64 usage, 70 internal error, 74 I/O error."};
  app.require_subcommand(1);
  app.fallthrough(false);
  Options o;

  auto add_json = [&o](CLI::App* c) {
    c->add_flag("--json", o.json, "Print JSON for scripts instead of text");
  };
  // CLI11 converts "-1" to an unsigned option by wrapping it to 2^64 - 1,
  // reads a leading 0 as octal (-g 036 named generation 30) and a number past
  // 2^64 - 1 as 2^64 - 1, so a generation or id typed (or copied from a
  // zero-padded file name) could name another one entirely. Generations and
  // ids are decimal digits only: a transform checks them, drops leading
  // zeros and refuses what does not fit, before CLI11 converts.
  const CLI::Validator digits_only(
      [](std::string& value) -> std::string {
        if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos) {
          return "'" + value + "' is not a whole number >= 0 (digits only)";
        }
        const std::string given = value;
        const std::size_t first = value.find_first_not_of('0');
        value = first == std::string::npos ? "0" : value.substr(first);
        static const std::string kMax = std::to_string(UINT64_MAX);
        if (value.size() > kMax.size() || (value.size() == kMax.size() && value > kMax)) {
          return "'" + given + "' is past the largest number allowed, " + kMax;
        }
        return {};
      },
      "", "digits");
  // A segment name the engine would refuse ("a b", "x/y", "..") is a usage
  // error naming the option, as a bad number is, in every command and also
  // beside a DIR (where it was once passed over as a segment to skip): the
  // library's check, before anything is looked at. "" is no segment, as for
  // the engine.
  const CLI::Validator shm_name(
      [](std::string& value) -> std::string {
        if (value.empty()) return {};
        const jobengine::Status s = st::check_shm_name(value);
        return s.ok() ? std::string() : std::string(s.message());
      },
      "", "shm-name");
  // A value that starts like an option is an option whose value was left
  // out (`--handler --json` filtered on a handler named "--json"): a usage
  // error. (A file whose name starts with '-' is given as ./-name.)
  const CLI::Validator not_an_option(
      [](std::string& value) -> std::string {
        if (value.empty() || value[0] != '-') return {};
        return "a value is missing (" + value + " is an option)";
      },
      "", "value");
  const CLI::Validator gen_validator =
      CLI::Range(std::uint64_t{1}, UINT64_MAX).description("at least 1");

  // list
  std::string list_dir, list_shm;
  CLI::App* list = app.add_subcommand(
      "list", "Every generation in DIR (and the image in segment --shm) with its time, cut, job "
              "counts, bytes, and valid or exactly why not; '=>' marks the one the next engine "
              "start loads");
  list->add_option("DIR", list_dir, "Snapshot directory");
  list->add_option("--shm", list_shm, "Shared-memory segment name")
      ->check(shm_name)
      ->type_name("NAME");
  add_json(list);

  // inspect / dump / verify share a source
  st::Source src;
  std::optional<std::uint64_t> src_gen;
  auto add_source = [&](CLI::App* c) {
    c->add_option("SOURCE", src.path,
                  "Snapshot file, or directory (its newest valid generation, as the engine loads "
                  "it)");
    c->add_option("--shm", src.shm,
                  "Shared-memory segment name (alone: its image; with a DIR: the newest of both)")
        ->check(shm_name)
        ->type_name("NAME");
    c->add_option("--generation,-g", src_gen, "With a DIR: this generation")
        ->transform(digits_only)
        ->check(gen_validator)
        ->type_name("N");
  };
  CLI::App* inspect = app.add_subcommand(
      "inspect", "Header, counts by handler, state and priority, the oldest live job, and the "
                 "dead/quarantined jobs with their reason and recovery count");
  add_source(inspect);
  add_json(inspect);

  DumpFilter filter;
  CLI::App* dump = app.add_subcommand(
      "dump", "The jobs as JSON, one object per line (payload as text when printable, else "
              "base64: see payload_encoding)");
  add_source(dump);
  dump->add_option("--handler", filter.handlers, "Only jobs of this handler (repeatable)")
      ->check(not_an_option)
      ->type_name("NAME");
  dump->add_option("--state", filter.states, "Only jobs in this state (repeatable)")
      ->check(CLI::IsMember({"pending", "running-at-cut", "delayed", "waiting-retry", "dead"}));
  dump->add_option("--id", filter.ids, "Only the job with this id (repeatable)")
      ->transform(digits_only)
      ->type_name("ID");
  add_json(dump);

  CLI::App* verify = app.add_subcommand(
      "verify", "Check every checksum and bound of a file, a generation, a segment, or every "
                "generation of a directory; the exit status names the first failure's class and "
                "the output its byte offset");
  add_source(verify);
  add_json(verify);

  // diff
  std::string diff_a, diff_b;
  CLI::App* diff = app.add_subcommand(
      "diff", "Jobs added, removed and changed (which fields) from snapshot A to snapshot B; "
              "each is a file, a directory (its newest valid generation) or shm:NAME. Exit 1 "
              "when they differ");
  diff->add_option("A", diff_a, "First snapshot")->required();
  diff->add_option("B", diff_b, "Second snapshot")->required();
  add_json(diff);

  // restore
  std::string restore_path, restore_shm, restore_from_shm, restore_to_shm, restore_from_file;
  std::optional<std::uint64_t> restore_gen;
  CLI::App* restore = app.add_subcommand(
      "restore",
      "Roll back: make a chosen snapshot the one the next engine start loads, keeping newer "
      "generations aside.\n"
      "  jobsnap restore DIR --generation N [--shm NAME]   generation N of DIR (and the segment)\n"
      "  jobsnap restore DIR --from-shm NAME               the segment's image, to DIR\n"
      "  jobsnap restore DIR --from-file FILE [--shm NAME] a file (e.g. one kept aside), to DIR\n"
      "  jobsnap restore FILE|DIR [-g N] --to-shm NAME     a file or generation, to the segment "
      "only");
  restore->add_option("PATH", restore_path, "Snapshot directory (or, with --to-shm, a file)");
  restore->add_option("--generation,-g", restore_gen, "The generation of DIR to restore")
      ->transform(digits_only)
      ->check(gen_validator)
      ->type_name("N");
  restore->add_option("--shm", restore_shm,
                      "The engine's segment: written too, so that it holds no newer image")
      ->check(shm_name)
      ->type_name("NAME");
  auto* from_shm_opt =
      restore->add_option("--from-shm", restore_from_shm, "Restore this segment's image into DIR")
          ->check(shm_name)
          ->type_name("NAME");
  auto* from_file_opt =
      restore->add_option("--from-file", restore_from_file, "Restore this snapshot file into DIR")
          ->check(not_an_option)
          ->type_name("FILE");
  auto* to_shm_opt = restore->add_option("--to-shm", restore_to_shm,
                                         "Write the chosen snapshot into this segment only")
                        ->check(shm_name)
                        ->type_name("NAME");
  from_shm_opt->excludes(from_file_opt)->excludes(to_shm_opt);
  from_file_opt->excludes(to_shm_opt);
  add_json(restore);

  // requeue / drop
  std::string edit_dir, edit_shm;
  std::vector<std::uint64_t> edit_ids;
  std::optional<std::uint64_t> edit_from;
  auto add_edit = [&](CLI::App* c) {
    c->add_option("DIR", edit_dir, "The engine's snapshot directory")->required();
    c->add_option("ID", edit_ids, "Job ids")->required()->transform(digits_only)->type_name("ID");
    c->add_option("--shm", edit_shm,
                  "The engine's segment: its image counts as a source and the new generation is "
                  "written there too")
        ->check(shm_name)
        ->type_name("NAME");
    c->add_option("--from", edit_from,
                  "Start from this generation of DIR (default: what the engine would load); "
                  "newer generations are moved aside, as restore moves them")
        ->transform(digits_only)
        ->check(gen_validator)
        ->type_name("N");
    add_json(c);
  };
  CLI::App* requeue = app.add_subcommand(
      "requeue", "Move dead jobs back to pending (attempts and recoveries reset, last error kept) "
                 "in a new generation; refused while an engine holds DIR");
  add_edit(requeue);
  CLI::App* drop = app.add_subcommand(
      "drop", "Remove jobs (any state) in a new generation; refused while an engine holds DIR");
  add_edit(drop);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help, or the error and a hint (stderr)
    if (code == 0) return kExitOk;
    // The parse failed, so --json was not parsed either; a script that asked
    // for JSON anywhere in the command line reads the error object on stdout
    // like any other failure's (jobsnap.md).
    const bool json_wanted = std::any_of(argv + 1, argv + argc, [](const char* arg) {
      return std::string_view(arg) == "--json";
    });
    if (json_wanted) {
      print_json_error(st::Failure::kUsage, e.what(), st::Diagnosis{st::Failure::kUsage, false, 0});
    }
    return kExitUsage;
  }
  src.generation = src_gen;

  auto usage = [&](const std::string& msg) {
    return report_failure(jobengine::Status(jobengine::StatusCode::kInvalidArgument, msg),
                          st::Diagnosis{st::Failure::kUsage, false, 0}, o);
  };

  if (list->parsed()) {
    if (list_dir.empty() && list_shm.empty()) return usage("list needs DIR, --shm NAME, or both");
    return cmd_list(list_dir, list_shm, o);
  }
  auto need_source = [&]() { return src.path.empty() && src.shm.empty(); };
  if (inspect->parsed()) {
    if (need_source()) return usage("inspect needs a FILE, a DIR or --shm NAME");
    return cmd_inspect(src, o);
  }
  if (dump->parsed()) {
    if (need_source()) return usage("dump needs a FILE, a DIR or --shm NAME");
    return cmd_dump(src, filter, o);
  }
  if (verify->parsed()) {
    if (need_source()) return usage("verify needs a FILE, a DIR or --shm NAME");
    return cmd_verify(src, o);
  }
  if (diff->parsed()) return cmd_diff(diff_a, diff_b, o);
  if (restore->parsed()) {
    st::RestoreRequest req;
    if (!restore_to_shm.empty()) {
      if (restore_path.empty()) return usage("restore --to-shm needs a FILE or DIR to restore");
      if (!restore_shm.empty()) return usage("give --to-shm or --shm, not both");
      req.source.path = restore_path;
      req.source.generation = restore_gen;
      req.target_shm = restore_to_shm;
    } else {
      if (restore_path.empty()) return usage("restore needs the engine's snapshot DIR");
      req.target_dir = restore_path;
      req.target_shm = restore_shm;
      if (!restore_from_shm.empty()) {
        if (restore_gen) return usage("give --generation or --from-shm, not both");
        req.source.shm = restore_from_shm;
      } else if (!restore_from_file.empty()) {
        if (restore_gen) return usage("give --generation or --from-file, not both");
        req.source.path = restore_from_file;
        req.source.file_only = true;  // a snapshot file, never a directory's newest
      } else {
        if (!restore_gen) {
          return usage("restore DIR needs --generation N (or --from-shm NAME, --from-file FILE)");
        }
        req.source.path = restore_path;
        req.source.generation = restore_gen;
      }
    }
    st::Diagnosis d;
    auto r = st::restore(req, &d);
    if (!r) return report_failure(r.status(), d, o);
    return print_write(*r, "restored", o, !req.target_dir.empty() && req.target_shm.empty());
  }
  if (requeue->parsed() || drop->parsed()) {
    st::EditRequest req;
    req.dir = edit_dir;
    req.shm = edit_shm;
    req.from_generation = edit_from;
    st::Diagnosis d;
    auto r = requeue->parsed() ? st::requeue_jobs(req, edit_ids, &d) : st::drop_jobs(req, edit_ids, &d);
    if (!r) return report_failure(r.status(), d, o);
    std::string what = requeue->parsed() ? "requeued" : "dropped";
    what += " job";
    if (edit_ids.size() != 1) what += "s";
    for (auto id : edit_ids) {
      what += ' ';
      what += std::to_string(id);
    }
    return print_write(*r, what, o, edit_shm.empty());
  }
  return usage("no command given");
}

// What was printed must have reached stdout: a full disk, a closed pipe or
// `> /dev/full` would otherwise lose a listing, a dump or a JSON document and
// still exit 0. stdout is buffered (std::cout writes through it: synced with
// stdio), so a write error may only show at this final flush. A command that
// already failed keeps its own status, the more specific one; a result that
// did not reach its reader (0, or diff's 1) becomes an I/O error. After a
// write command that succeeded, the line says so: the change was made (a
// caller that took the status for a failed restore and ran it again would
// publish yet another generation), only its report was lost.
int finish_stdout(int code) {
  errno = 0;
  const bool flushed = std::fflush(stdout) == 0;  // first: its errno names the failure
  const int err = errno;
  std::cout.flush();
  if (flushed && std::ferror(stdout) == 0 && std::cout.good()) return code;
  std::cerr << "jobsnap: io-error: write to standard output: "
            << (!flushed && err != 0 ? std::strerror(err) : "a write failed");
  if (!g_write_done.empty() && code == kExitOk) {
    std::cerr << " (the command itself succeeded: " << g_write_done << "; only its report was lost)";
  }
  std::cerr << "\n";
  return code == kExitOk || code == kExitDiffers ? kExitIoError : code;
}

}  // namespace

int main(int argc, char** argv) {
  // A closed stdout is an EPIPE that finish_stdout() reports (exit 74, and
  // for a write command that its change was made), not a silent death.
  std::signal(SIGPIPE, SIG_IGN);
  int code = kExitInternal;
  try {
    code = run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "jobsnap: internal error: " << e.what() << "\n";
  }
  return finish_stdout(code);
}
