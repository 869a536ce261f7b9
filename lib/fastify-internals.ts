// What the plugin reads from (or does to) Fastify beyond its public API, in one place: whether an
// instance is the root one, router options (where Fastify 5 keeps them), the extra servers Fastify
// opens when listening on `localhost`, the route config of a request without the allocating
// `request.routeOptions` getter, a listen() that does more once the server listens, and which
// router callbacks and upgrade listeners are Fastify's or @fastify/websocket's own.
import { readFileSync } from 'node:fs'
import type { Server } from 'node:net'
import type { RouterOptions } from './intentions/path'

/**
 * Whether `fastify` is the root instance: Fastify creates each encapsulated child with
 * `Object.create(parent)`, and only the root's hooks reach every route (and 404s).
 */
export function isRootInstance (fastify: object): boolean {
  return Object.getPrototypeOf(fastify) === Object.prototype
}

/** The key under which Fastify's request logger writes the request id (`requestIdLogLabel`). */
export function requestIdLabelOf (fastify: object & { readonly initialConfig: object }): string {
  // Fastify 5.12 moved the label to its log controller (option `logController`; built from the
  // deprecated top-level option otherwise), which its request logger reads: so does the plugin.
  const controller = privateValue(fastify, 'fastify.logController') as { requestIdLogLabel?: unknown } | undefined
  const label = controller?.requestIdLogLabel ?? (fastify.initialConfig as { requestIdLogLabel?: unknown }).requestIdLogLabel
  return typeof label === 'string' && label !== '' ? label : 'reqId'
}

const ROUTER_KEYS = ['ignoreTrailingSlash', 'ignoreDuplicateSlashes', 'caseSensitive', 'useSemicolonDelimiter'] as const

/**
 * The router options that decide which spellings of a path reach the same handler, as the router
 * really uses them (docs/semantics.md#paths-router-options). Fastify 5 builds find-my-way's options
 * from `routerOptions` and, for each key absent there, the deprecated top-level key; `initialConfig`
 * cannot tell which (its validator fills `routerOptions` with defaults), so the options object
 * Fastify handed to the router is read from its private symbol, with find-my-way's own defaults.
 * Without it (another Fastify version), each option counts as set when either spelling sets it:
 * more spellings are checked, never fewer.
 */
export function routerOptionsOf (fastify: object & { readonly initialConfig: object }): RouterOptions {
  const used = privateValue(fastify, 'fastify.options') as { routerOptions?: Record<string, unknown> } | undefined
  const router = used?.routerOptions
  if (router !== undefined && router !== null && typeof router === 'object') {
    return {
      ignoreTrailingSlash: Boolean(router.ignoreTrailingSlash),
      ignoreDuplicateSlashes: Boolean(router.ignoreDuplicateSlashes),
      caseSensitive: router.caseSensitive === undefined ? true : Boolean(router.caseSensitive),
      useSemicolonDelimiter: Boolean(router.useSemicolonDelimiter)
    }
  }
  const config = fastify.initialConfig as Record<string, unknown>
  const nested = (config.routerOptions ?? {}) as Record<string, unknown>
  const out: RouterOptions = { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false }
  for (const key of ROUTER_KEYS) {
    const widened = key !== 'caseSensitive'
    out[key] = config[key] === widened || nested[key] === widened ? widened : !widened
  }
  return out
}

function privateValue (target: object, description: string): unknown {
  for (const symbol of Object.getOwnPropertySymbols(target)) {
    if (symbol.description === description) return (target as Record<symbol, unknown>)[symbol]
  }
  return undefined
}

/**
 * Fastify keeps its extra `localhost` servers under a private symbol; find it by description.
 * Without it (another Fastify version) only `fastify.server` follows rotations, and the plugin says so.
 */
export function serverBindingsOf (fastify: object): unknown[] | null {
  for (const symbol of Object.getOwnPropertySymbols(fastify)) {
    if (symbol.description === 'fastify.serverBindings') {
      const bindings = (fastify as Record<symbol, unknown>)[symbol]
      return Array.isArray(bindings) ? bindings : null
    }
  }
  return null
}

/**
 * Reads a request's route config. `request.routeOptions` builds a new object on every access;
 * Fastify keeps the route context under a private symbol, found once by its description. Falls
 * back to the public getter if this Fastify has no such symbol.
 */
export function routeConfigReader (): (request: { routeOptions: { config: object } }) => Record<string | symbol, unknown> {
  let key: symbol | null | undefined
  return (request) => {
    if (key === undefined) {
      key = Object.getOwnPropertySymbols(request).find((symbol) => symbol.description === 'fastify.context') ?? null
    }
    if (key !== null) {
      const context = (request as unknown as Record<symbol, { config?: Record<string | symbol, unknown> } | undefined>)[key]
      if (context?.config !== undefined) return context.config
    }
    return request.routeOptions.config as Record<string | symbol, unknown>
  }
}

/**
 * For a `listen()` that began before the plugin loaded (`register()` not awaited), so that
 * `extendListen` came too late: the server's next `listen()` call holds its `'listening'` event
 * until `beforeListening` settles. Fastify's listen() (both forms) waits for that event, so it
 * resolves only after `beforeListening`; a rejection closes the server and becomes the `'error'`
 * that rejects it, then `onFailed` runs. `skip()` true at that call: extendListen handles it.
 * Both wrappers are in place only from the plugin's load until the first 'listening' or 'error' event.
 */
export function holdListening (server: Server, skip: () => boolean, beforeListening: () => Promise<void>,
  onFailed: (err: Error) => void): void {
  const ownListen = Object.hasOwn(server, 'listen')
  const listen = server.listen
  server.listen = function (this: Server, ...args: unknown[]) {
    if (ownListen) server.listen = listen
    else delete (server as Partial<Server>).listen
    if (!skip()) holdNextListening(server, beforeListening, onFailed)
    return (listen as (...a: unknown[]) => Server).apply(this, args)
  } as Server['listen']
}

function holdNextListening (server: Server, beforeListening: () => Promise<void>, onFailed: (err: Error) => void): void {
  const emit = server.emit as (this: Server, event: string | symbol, ...args: unknown[]) => boolean
  let held = false
  const hold = function (this: Server, event: string | symbol, ...args: unknown[]): boolean {
    if (held || (event !== 'listening' && event !== 'error')) return emit.call(this, event, ...args)
    held = true
    // Restored unless wrapped again meanwhile (the upgrade gate): then this stays a pass-through.
    if (server.emit === hold) server.emit = emit as Server['emit']
    // listen() failed (EADDRINUSE, ...): nothing to hold, and a retry goes through extendListen.
    if (event === 'error') return emit.call(this, event, ...args)
    beforeListening().then(() => { emit.call(server, 'listening') }, (err: Error) => {
      server.close()
      // Fastify listens for 'error' until 'listening'; without a listener an 'error' would throw.
      if (server.listenerCount('error') > 0) emit.call(server, 'error', err)
      onFailed(err)
    })
    return true
  }
  server.emit = hold as Server['emit']
}

/**
 * Makes `fastify.listen()` run `afterListen` once the server listens, and fail (after closing the
 * app) when it throws: Fastify's own onListen hooks cannot fail listen(). Both the promise and the
 * callback forms keep working. `onCall` runs as soon as the extended listen() is called.
 */
export function extendListen (fastify: { listen: unknown, close: () => PromiseLike<unknown> }, afterListen: () => Promise<void>,
  onCall: () => void): void {
  const listen = fastify.listen as (...args: unknown[]) => Promise<string>
  fastify.listen = function (...args: unknown[]): Promise<string> | undefined {
    onCall()
    const callback = typeof args[args.length - 1] === 'function' ? args.pop() as (err: Error | null, address?: string) => void : null
    const listening = (async () => {
      const address = await listen.apply(fastify, args)
      try {
        await afterListen()
      } catch (err) {
        await fastify.close()
        throw err
      }
      return address
    })()
    if (callback === null) return listening
    listening.then((address) => callback(null, address), (err: Error) => callback(err))
    return undefined
  }
}

/**
 * A test for @fastify/websocket's own 'upgrade' listener, which sends every Upgrade through
 * Fastify's routing: its source text is found in that package's entry module, as resolved from
 * here or as any copy the process loaded (read once, on the first `onUpgrade` seen). A name is no
 * proof (any function can be called `onUpgrade`); a listener that cannot be recognised (the
 * package bundled) counts as foreign, which only gates more.
 */
export function fastifyWebsocketListenerTest (resolve: (id: string) => string = require.resolve,
  loaded: () => string[] = () => loadedSources(/[\\/]@fastify[\\/]websocket[\\/]index\.js$/)): (listener: Function) => boolean {
  let sources: string[] | undefined
  const known = new WeakMap<Function, boolean>()
  return (listener) => {
    if (listener.name !== 'onUpgrade') return false
    let isOurs = known.get(listener)
    if (isOurs === undefined) {
      // Every copy this process loaded (the application's may not be the one resolved from here).
      if (sources === undefined) {
        const resolved = sourceOf('@fastify/websocket', resolve)
        sources = resolved === null ? loaded() : [resolved, ...loaded()]
      }
      const text = Function.prototype.toString.call(listener)
      isOurs = sources.some((source) => source.includes(text))
      known.set(listener, isOurs)
    }
    return isOurs
  }
}

const ROUTER_HANDLERS = ['defaultRoute', 'onBadUrl', 'onMaxParamLength'] as const

/**
 * The router callbacks the application replaced (`routerOptions.defaultRoute`, `onBadUrl`,
 * `onMaxParamLength`). Fastify's own `defaultRoute` sends an unmatched request to its 404
 * handling, where the hooks run; a replacement answers the raw request with no hook at all.
 * Fastify's own are recognised by their source text in a loaded copy of Fastify's entry module
 * (`sources`: those texts); when none can be read, nothing is reported.
 */
export function replacedRouterHandlers (fastify: object, sources: readonly string[] = loadedFastifySources()): string[] {
  const router = (privateValue(fastify, 'fastify.options') as { routerOptions?: Record<string, unknown> } | undefined)?.routerOptions
  if (router === undefined || router === null || typeof router !== 'object' || sources.length === 0) return []
  return ROUTER_HANDLERS.filter((key) => {
    const handler = router[key]
    if (typeof handler !== 'function') return false
    const text = Function.prototype.toString.call(handler)
    return !sources.some((source) => source.includes(text))
  })
}

/** The source of every copy of Fastify's entry module this process loaded. */
function loadedFastifySources (): string[] {
  return loadedSources(/[\\/]fastify[\\/]fastify\.js$/)
}

/** The source of every module this process loaded whose file name matches `file`. */
function loadedSources (file: RegExp): string[] {
  const out: string[] = []
  for (const path of Object.keys(require.cache)) {
    const source = file.test(path) ? sourceOf(path, (id) => id) : null
    if (source !== null) out.push(source)
  }
  return out
}

/** The text of module `id`, or null when it cannot be resolved or read (it then proves nothing). */
function sourceOf (id: string, resolve: (id: string) => string): string | null {
  try {
    return readFileSync(resolve(id), 'utf8')
  } catch {
    return null
  }
}

/**
 * Makes this app's `reply.callNotFound()` (which moves a request to the 404 handler, running only
 * that handler's `preHandler` hooks, no `onRequest`) run `check` first: the 404 handler runs only
 * if it answers null, else the reply is sent that error. A reply decoration of that name replaces
 * Fastify's method for this app only (decorating also keeps Fastify from handing its routes the
 * shared, undecorated Reply class); false when Fastify's method is not found (another version).
 */
export function guardCallNotFound (fastify: { decorateReply: (name: string, fn: unknown) => unknown }, check: (reply: { request: unknown }) => Error | null | Promise<Error | null>): boolean {
  const reply = privateValue(fastify, 'fastify.Reply') as { prototype: Record<string, unknown> } | undefined
  const callNotFound = reply?.prototype.callNotFound
  if (typeof callNotFound !== 'function') return false
  fastify.decorateReply('callNotFound', function guardedCallNotFound (this: { request: unknown, send: (err: Error) => unknown }) {
    const go = (err: Error | null): void => {
      if (err === null) callNotFound.call(this)
      else this.send(err)
    }
    const outcome = check(this)
    if (outcome instanceof Promise) outcome.then(go, /* c8 ignore next -- check never rejects; a bug is refused, not crashed */ (err: Error) => { this.send(err) })
    else go(outcome)
    return this
  })
  return true
}
