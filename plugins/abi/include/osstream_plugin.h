/* osstream backend plugin ABI, version 1.0.
 *
 * A plugin is a shared library that exports
 *
 *     const struct osstream_plugin *osstream_plugin_init(const struct osstream_host *host);
 *
 * returning a pointer to a static table. This header mirrors plugins/abi/src/lib.rs; a test
 * compiles a C plugin against it and loads it, so the two stay in step.
 *
 * Versioning: fields are only appended (minor bump). The host copies
 * min(struct_size, its size) bytes and treats fields past struct_size as absent; another
 * major version is refused. The host never unloads a plugin.
 *
 * Callbacks that can fail return 0 on success, or -1 after filling *error. They run on the
 * host's blocking thread pool; with OSSTREAM_THREAD_MODEL_SERIALIZE never two at once.
 */
#ifndef OSSTREAM_PLUGIN_H
#define OSSTREAM_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define OSSTREAM_ABI_MAJOR 1
#define OSSTREAM_ABI_MINOR 0

#define OSSTREAM_THREAD_MODEL_PARALLEL 0
#define OSSTREAM_THREAD_MODEL_SERIALIZE 1

#define OSSTREAM_ERROR_NOT_FOUND 1
#define OSSTREAM_ERROR_OUT_OF_RANGE 2
#define OSSTREAM_ERROR_UNSUPPORTED 3
#define OSSTREAM_ERROR_READ_ONLY 4
#define OSSTREAM_ERROR_INVALID_INPUT 5
#define OSSTREAM_ERROR_PERMISSION_DENIED 6
#define OSSTREAM_ERROR_NO_SPACE 7
#define OSSTREAM_ERROR_IO 8
#define OSSTREAM_ERROR_UNEXPECTED 9

#define OSSTREAM_WRITE_FUA 1

#define OSSTREAM_LOG_ERROR 1
#define OSSTREAM_LOG_WARN 2
#define OSSTREAM_LOG_INFO 3
#define OSSTREAM_LOG_DEBUG 4

#define OSSTREAM_ERROR_MESSAGE_MAX 1024

struct osstream_error {
  uint32_t kind;        /* OSSTREAM_ERROR_* */
  uint32_t temporary;   /* non-zero: retrying may succeed */
  uint32_t message_len; /* bytes of message in use (UTF-8, no NUL needed) */
  uint8_t message[OSSTREAM_ERROR_MESSAGE_MAX];
};

struct osstream_host {
  uint32_t struct_size;
  uint32_t abi_major;
  uint32_t abi_minor;
  void (*log)(uint32_t level, const uint8_t *message, size_t len); /* never NULL */
};

typedef void (*osstream_list_emit)(void *ctx, const char *name, uint64_t size,
                                   const char *generation);

struct osstream_plugin {
  uint32_t struct_size; /* sizeof(struct osstream_plugin) as the plugin was built */
  uint32_t abi_major;
  uint32_t abi_minor;
  uint32_t thread_model;
  const char *name;    /* required */
  const char *version; /* required */

  /* required */
  int (*load)(const uint8_t *config_json, size_t config_len, void **instance,
              struct osstream_error *error);
  void (*unload)(void *instance);
  int (*list)(void *instance, osstream_list_emit emit, void *ctx, struct osstream_error *error);
  /* required */
  int (*open)(void *instance, const char *name, int writable, void **handle,
              struct osstream_error *error);
  /* required */
  void (*close)(void *handle);
  /* required */
  int (*get_size)(void *handle, uint64_t *size, struct osstream_error *error);
  int (*block_size)(void *handle, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum,
                    struct osstream_error *error);
  int (*can_write)(void *handle);
  /* required */
  int (*pread)(void *handle, uint8_t *buf, uint32_t count, uint64_t offset,
               struct osstream_error *error);
  int (*pwrite)(void *handle, const uint8_t *buf, uint32_t count, uint64_t offset,
                uint32_t flags, struct osstream_error *error);
  int (*flush)(void *handle, struct osstream_error *error);
  int (*trim)(void *handle, uint32_t count, uint64_t offset, struct osstream_error *error);
  int (*generation)(void *handle, char *buf, size_t len, struct osstream_error *error);
};

const struct osstream_plugin *osstream_plugin_init(const struct osstream_host *host);

#ifdef __cplusplus
}
#endif

#endif /* OSSTREAM_PLUGIN_H */
