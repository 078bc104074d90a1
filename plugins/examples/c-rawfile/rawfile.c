/* rawfile: a minimal osstream backend plugin in C.
 *
 * Serves every NAME.img file in one directory as the image NAME, with positional reads
 * and writes. Configuration: {"root": "/absolute/dir", "writable": true}. The JSON reader
 * below is deliberately tiny (no escapes in the path); a real plugin would use a library.
 *
 * Build:  cc -shared -fPIC -O2 -Wall -I../../abi/include -o librawfile.so rawfile.c
 *
 * The OSSTREAM_TEST_* macros build deliberately broken or older variants for the
 * host's tests; a real plugin has none of them.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "osstream_plugin.h"

struct instance {
  char root[4096];
  int writable;
};

struct handle {
  int fd;
  int writable;
  uint64_t size;
  char generation[64];
};

static const struct osstream_host *host;

static int fail(struct osstream_error *error, uint32_t kind, const char *what, int err) {
  error->kind = kind;
  error->temporary = (err == EINTR || err == EAGAIN);
  int n = snprintf((char *)error->message, sizeof error->message, "%s: %s", what,
                   err ? strerror(err) : "failed");
  error->message_len = n < 0 ? 0 : (n >= (int)sizeof error->message ? sizeof error->message - 1 : (uint32_t)n);
  return -1;
}

static uint32_t kind_of(int err) {
  switch (err) {
  case ENOENT: return OSSTREAM_ERROR_NOT_FOUND;
  case EACCES: case EPERM: return OSSTREAM_ERROR_PERMISSION_DENIED;
  case ENOSPC: case EDQUOT: return OSSTREAM_ERROR_NO_SPACE;
  case EROFS: return OSSTREAM_ERROR_READ_ONLY;
  default: return OSSTREAM_ERROR_IO;
  }
}

/* Finds "key": and copies the string value that follows into out. */
static int json_string(const char *json, size_t len, const char *key, char *out, size_t out_len) {
  char pattern[64];
  snprintf(pattern, sizeof pattern, "\"%s\"", key);
  const char *at = memmem(json, len, pattern, strlen(pattern));
  if (!at) return -1;
  const char *end = json + len;
  const char *p = at + strlen(pattern);
  while (p < end && (*p == ' ' || *p == ':')) p++;
  if (p >= end || *p != '"') return -1;
  const char *start = ++p;
  while (p < end && *p != '"') p++;
  if (p >= end || (size_t)(p - start) >= out_len) return -1;
  memcpy(out, start, p - start);
  out[p - start] = 0;
  return 0;
}

static int rf_load(const uint8_t *config, size_t len, void **instance, struct osstream_error *error) {
  struct instance *in = calloc(1, sizeof *in);
  if (!in) return fail(error, OSSTREAM_ERROR_UNEXPECTED, "out of memory", ENOMEM);
  if (json_string((const char *)config, len, "root", in->root, sizeof in->root) != 0 || in->root[0] != '/') {
    free(in);
    return fail(error, OSSTREAM_ERROR_INVALID_INPUT, "config needs \"root\": an absolute directory", 0);
  }
  in->writable = memmem(config, len, "\"writable\": true", 16) || memmem(config, len, "\"writable\":true", 15);
  struct stat st;
  if (stat(in->root, &st) != 0 || !S_ISDIR(st.st_mode)) {
    int err = errno;
    free(in);
    return fail(error, OSSTREAM_ERROR_NOT_FOUND, "root is not a directory", err ? err : ENOTDIR);
  }
  char line[4200];
  int n = snprintf(line, sizeof line, "rawfile serving %s%s", in->root, in->writable ? " (writable)" : "");
  if (host && host->log) host->log(OSSTREAM_LOG_INFO, (const uint8_t *)line, n > 0 ? (size_t)n : 0);
  *instance = in;
  return 0;
}

static void rf_unload(void *instance) { free(instance); }

static int rf_list(void *instance, osstream_list_emit emit, void *ctx, struct osstream_error *error) {
  struct instance *in = instance;
  DIR *dir = opendir(in->root);
  if (!dir) return fail(error, kind_of(errno), "opendir", errno);
  struct dirent *entry;
  while ((entry = readdir(dir)) != NULL) {
    size_t len = strlen(entry->d_name);
    if (len <= 4 || entry->d_name[0] == '.' || strcmp(entry->d_name + len - 4, ".img") != 0) continue;
    char name[256], path[4400], generation[64];
    snprintf(name, sizeof name, "%.*s", (int)(len - 4), entry->d_name);
    snprintf(path, sizeof path, "%s/%s", in->root, entry->d_name);
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
    snprintf(generation, sizeof generation, "%lld.%09ld", (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    emit(ctx, name, (uint64_t)st.st_size, generation);
  }
  closedir(dir);
  return 0;
}

static int rf_open(void *instance, const char *name, int writable, void **handle, struct osstream_error *error) {
  struct instance *in = instance;
  if (strchr(name, '/') || name[0] == '.') return fail(error, OSSTREAM_ERROR_INVALID_INPUT, "bad image name", 0);
  if (writable && !in->writable) return fail(error, OSSTREAM_ERROR_READ_ONLY, "backend is read-only", 0);
  char path[4400];
  snprintf(path, sizeof path, "%s/%s.img", in->root, name);
  int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return fail(error, kind_of(errno), path, errno);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    return fail(error, OSSTREAM_ERROR_IO, "fstat", err);
  }
  struct handle *h = calloc(1, sizeof *h);
  if (!h) {
    close(fd);
    return fail(error, OSSTREAM_ERROR_UNEXPECTED, "out of memory", ENOMEM);
  }
  h->fd = fd;
  h->writable = writable;
  h->size = (uint64_t)st.st_size;
  snprintf(h->generation, sizeof h->generation, "%lld.%09ld", (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
  *handle = h;
  return 0;
}

static void rf_close(void *handle) {
  struct handle *h = handle;
  close(h->fd);
  free(h);
}

static int rf_get_size(void *handle, uint64_t *size, struct osstream_error *error) {
  (void)error;
  *size = ((struct handle *)handle)->size;
  return 0;
}

static int rf_can_write(void *handle) { return ((struct handle *)handle)->writable; }

static __attribute__((unused)) int rf_pread(void *handle, uint8_t *buf, uint32_t count, uint64_t offset, struct osstream_error *error) {
  struct handle *h = handle;
  while (count > 0) {
    ssize_t n = pread(h->fd, buf, count, (off_t)offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(error, kind_of(errno), "pread", errno);
    if (n == 0) return fail(error, OSSTREAM_ERROR_IO, "pread: file shrank", 0);
    buf += n;
    count -= (uint32_t)n;
    offset += (uint64_t)n;
  }
  return 0;
}

static int rf_pwrite(void *handle, const uint8_t *buf, uint32_t count, uint64_t offset, uint32_t flags,
                     struct osstream_error *error) {
  struct handle *h = handle;
  while (count > 0) {
    ssize_t n = pwrite(h->fd, buf, count, (off_t)offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(error, kind_of(errno), "pwrite", errno);
    buf += n;
    count -= (uint32_t)n;
    offset += (uint64_t)n;
  }
  if ((flags & OSSTREAM_WRITE_FUA) && fdatasync(h->fd) != 0) return fail(error, kind_of(errno), "fdatasync", errno);
  return 0;
}

static int rf_flush(void *handle, struct osstream_error *error) {
  if (fdatasync(((struct handle *)handle)->fd) != 0) return fail(error, kind_of(errno), "fdatasync", errno);
  return 0;
}

static int rf_trim(void *handle, uint32_t count, uint64_t offset, struct osstream_error *error) {
  struct handle *h = handle;
  if (fallocate(h->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, count) != 0 && errno != EOPNOTSUPP)
    return fail(error, kind_of(errno), "fallocate", errno);
  return 0;
}

static int rf_generation(void *handle, char *buf, size_t len, struct osstream_error *error) {
  struct handle *h = handle;
  if (strlen(h->generation) + 1 > len) return fail(error, OSSTREAM_ERROR_INVALID_INPUT, "generation buffer", 0);
  strcpy(buf, h->generation);
  return 0;
}

#ifndef OSSTREAM_TEST_MAJOR
#define OSSTREAM_TEST_MAJOR OSSTREAM_ABI_MAJOR
#endif

static const struct osstream_plugin table = {
#ifdef OSSTREAM_TEST_OLD_MINOR
  /* As if built before `trim` and `generation` were appended: the host must treat them
   * as absent. */
  .struct_size = offsetof(struct osstream_plugin, trim),
#else
  .struct_size = sizeof(struct osstream_plugin),
#endif
  .abi_major = OSSTREAM_TEST_MAJOR,
  .abi_minor = OSSTREAM_ABI_MINOR,
  .thread_model = OSSTREAM_THREAD_MODEL_PARALLEL,
  .name = "rawfile",
  .version = "1.0.0",
  .load = rf_load,
  .unload = rf_unload,
  .list = rf_list,
  .open = rf_open,
  .close = rf_close,
  .get_size = rf_get_size,
  .block_size = NULL,
  .can_write = rf_can_write,
#ifdef OSSTREAM_TEST_NO_PREAD
  .pread = NULL,
#else
  .pread = rf_pread,
#endif
  .pwrite = rf_pwrite,
  .flush = rf_flush,
  .trim = rf_trim,
  .generation = rf_generation,
};

const struct osstream_plugin *osstream_plugin_init(const struct osstream_host *h) {
  host = h;
#ifdef OSSTREAM_TEST_NULL_TABLE
  (void)table;
  return NULL;
#else
  return &table;
#endif
}
