// The agent's HTTP traffic on a worker thread (option `agent.worker`, docs/semantics.md#agent-worker).
// Why: Node's HTTP, stream and event code is shared by servers and clients within one V8 isolate.
// Once it has seen an HTTP client's objects (undici's long polls to the agent), its property loads
// on the server's requests turn megamorphic and its calls generic: every request the application
// serves then executes about 4% more instructions (bench/instructions.js, README "Instructions per
// request"). The worker's own cost follows the clock, not the load (about 0.1 ms of CPU per second).
// On a thread of its own the client runs in another isolate and leaves the serving code as it was.
//
// One worker per process serves every AgentClient that asks for it: each message carries its
// client's target, and the worker keeps that client's two pools (lib/agent/exchange.ts) until
// the client closes. The thread keeps the process alive only while a call is pending (as an
// in-flight socket would), and exits by itself once no client has been open for a while.
import { existsSync } from 'node:fs'
import { extname, join } from 'node:path'
import { Worker } from 'node:worker_threads'
import type { MessagePort } from 'node:worker_threads'
import { ExchangePools } from './exchange'
import type { ExchangeRequest, ExchangeResponse, ExchangeTarget } from './exchange'

/** How long the worker outlives its last client: an app closed and built again reuses it. */
export const IDLE_EXIT_MS = 2_000

/** The worker's entry, next to this module (`.js` when built, `.ts` when run from source). */
export const AGENT_WORKER_FILE = join(__dirname, `agent-worker${extname(__filename)}`)

type ToWorker =
  | { readonly type: 'call', readonly id: number, readonly client: number, readonly target: ExchangeTarget, readonly req: ExchangeRequest }
  | { readonly type: 'abort', readonly id: number }
  | { readonly type: 'close', readonly id: number, readonly client: number }
  | { readonly type: 'exit' }

/** A transport failure, as it crosses the thread boundary (what AgentClient reads of it). */
interface FailureData { readonly name: string, readonly message: string, readonly code: string | undefined }

type FromWorker =
  | { readonly id: number, readonly ok: true, readonly response: ExchangeResponse | null }
  | { readonly id: number, readonly ok: false, readonly error: FailureData }

/** What an AgentClient sends its exchanges through: its own pools, or the worker's. */
export interface Exchanger {
  exchange: (req: ExchangeRequest, signal: AbortSignal | undefined) => Promise<ExchangeResponse>
  destroy: () => Promise<void>
  /** Where the exchanges run. */
  readonly thread: 'worker' | 'main'
}

/** The worker's side: answers exchanges with one ExchangePools per client, until told to exit. */
export function serveExchanges (port: MessagePort): void {
  const clients = new Map<number, ExchangePools>()
  const calls = new Map<number, AbortController>()
  const reply = (message: FromWorker): void => port.postMessage(message)
  port.on('message', (message: ToWorker) => {
    switch (message.type) {
      case 'call': {
        let pools = clients.get(message.client)
        if (pools === undefined) clients.set(message.client, pools = new ExchangePools(message.target))
        const aborter = new AbortController()
        calls.set(message.id, aborter)
        pools.exchange(message.req, aborter.signal).then(
          (response) => reply({ id: message.id, ok: true, response }),
          (err: unknown) => reply({ id: message.id, ok: false, error: failureData(err) })
        ).finally(() => calls.delete(message.id))
        break
      }
      case 'abort':
        calls.get(message.id)?.abort()
        break
      case 'close': {
        const pools = clients.get(message.client)
        clients.delete(message.client)
        // Settled either way: the client is gone whatever its pools' end was.
        Promise.allSettled([pools?.destroy()]).then(() => reply({ id: message.id, ok: true, response: null }))
        break
      }
      case 'exit':
        // Nothing is open any more (the main thread sends this only then): closing the port
        // empties the event loop, and the thread ends on its own.
        port.close()
        break
    }
  })
}

/** undici and Node fail with Error objects; what AgentClient reads of them is name, message and code. */
function failureData (err: unknown): FailureData {
  const e = err as Error & { code?: unknown }
  return { name: String(e.name), message: String(e.message), code: typeof e.code === 'string' ? e.code : undefined }
}

/** A failure rebuilt on the main thread: the same name, message and code as in the worker. */
function failureOf (data: FailureData): Error {
  const err = new Error(data.message)
  err.name = data.name
  if (data.code !== undefined) Object.defineProperty(err, 'code', { value: data.code, enumerable: true })
  return err
}

interface PendingCall {
  readonly resolve: (value: ExchangeResponse | null) => void
  readonly reject: (err: Error) => void
}

/** One running worker and the calls waiting for it. */
class RunningWorker {
  readonly worker: Worker
  readonly pending = new Map<number, PendingCall>()
  /** Whether it has answered anything: a worker that dies before that cannot start at all. */
  answered = false
  #failure: Error | null = null

  constructor (file: string, onExit: (running: RunningWorker) => void) {
    this.worker = new Worker(file)
    this.worker.unref()
    this.worker.on('message', (message: FromWorker) => {
      this.answered = true
      const call = this.pending.get(message.id)
      if (call === undefined) return // aborted meanwhile: its caller has its answer already
      this.#settled(message.id)
      if (message.ok) call.resolve(message.response)
      else call.reject(failureOf(message.error))
    })
    this.worker.on('error', (err) => { this.#failure = err })
    this.worker.on('exit', (code) => {
      const reason = `the agent worker thread exited (code ${code})${this.#failure === null ? '' : `: ${this.#failure.message}`}`
      for (const [id, call] of this.pending) {
        this.#settled(id)
        call.reject(Object.assign(new Error(reason), { cause: this.#failure }))
      }
      onExit(this)
    })
  }

  send (message: ToWorker & { readonly id: number }, call: PendingCall): void {
    // The thread holds the process open only while someone waits for it.
    if (this.pending.size === 0) this.worker.ref()
    this.pending.set(message.id, call)
    this.worker.postMessage(message)
  }

  forget (id: number): void {
    if (this.pending.has(id)) {
      this.#settled(id)
      this.worker.postMessage({ type: 'abort', id } satisfies ToWorker)
    }
  }

  #settled (id: number): void {
    this.pending.delete(id)
    if (this.pending.size === 0) this.worker.unref()
  }
}

/** The process's agent worker: started on the first call, ended when idle, replaced if it dies. */
export class AgentThread {
  readonly #file: string
  #running: RunningWorker | null = null
  /** Set when a worker died before answering anything: the clients then use their own pools. */
  #unusable = false
  #fileExists: boolean | null = null
  #openClients = 0
  #nextClient = 1
  #nextCall = 1
  #idleTimer: NodeJS.Timeout | null = null
  readonly #idleExitMs: number

  /** `idleExitMs`: how long the worker outlives its last client (tests shorten it). */
  constructor (file: string = AGENT_WORKER_FILE, idleExitMs: number = IDLE_EXIT_MS) {
    this.#file = file
    this.#idleExitMs = idleExitMs
  }

  /** False when the worker's file is missing (a bundle that left it out) or the worker could not start. */
  get usable (): boolean {
    this.#fileExists ??= existsSync(this.#file)
    return this.#fileExists && !this.#unusable
  }

  /** The running worker's thread id; null while none runs. */
  get threadId (): number | null {
    return this.#running?.worker.threadId ?? null
  }

  /** An Exchanger for one AgentClient: through this thread while it is usable, else through pools of its own. */
  exchanger (target: ExchangeTarget): Exchanger {
    const client = this.#nextClient++
    this.#opened()
    let own: ExchangePools | null = null
    let destroyed: Promise<void> | null = null
    const ownPools = (): ExchangePools => (own ??= new ExchangePools(target))
    const thread = this
    return {
      exchange: async (req, signal) => {
        // As undici's pools do once destroyed (the worker would otherwise open new ones).
        if (destroyed !== null) throw Object.assign(new Error('The client is destroyed'), { name: 'ClientDestroyedError', code: 'UND_ERR_DESTROYED' })
        if (!this.usable) return await ownPools().exchange(req, signal)
        return await this.#call(client, target, req, signal) as ExchangeResponse
      },
      destroy: () => {
        destroyed ??= this.#close(client).then(async () => { await own?.destroy() }).finally(() => this.#closed())
        return destroyed
      },
      get thread () {
        return thread.usable ? 'worker' : 'main'
      }
    }
  }

  #worker (): RunningWorker {
    this.#running ??= new RunningWorker(this.#file, (running) => {
      // A worker detached for its idle exit is no longer this thread's concern.
      if (this.#running !== running) return
      this.#running = null
      if (!running.answered) this.#unusable = true
    })
    return this.#running
  }

  #call (client: number, target: ExchangeTarget, req: ExchangeRequest, signal: AbortSignal | undefined): Promise<ExchangeResponse | null> {
    return new Promise((resolve, reject) => {
      if (signal?.aborted === true) {
        reject(signal.reason)
        return
      }
      const running = this.#worker()
      const id = this.#nextCall++
      const onAbort = (): void => {
        running.forget(id)
        reject(signal?.reason)
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      const done = (): void => signal?.removeEventListener('abort', onAbort)
      running.send({ type: 'call', id, client, target, req }, {
        resolve: (value) => { done(); resolve(value) },
        reject: (err) => { done(); reject(err) }
      })
    })
  }

  /** Destroys the client's pools in the worker (if it has a worker): its calls in flight fail. */
  async #close (client: number): Promise<void> {
    const running = this.#running
    if (running === null) return
    const id = this.#nextCall++
    // A worker that dies meanwhile has no pools left to close.
    await new Promise<unknown>((resolve) => running.send({ type: 'close', id, client }, { resolve, reject: resolve }))
  }

  #opened (): void {
    this.#openClients++
    if (this.#idleTimer !== null) {
      clearTimeout(this.#idleTimer)
      this.#idleTimer = null
    }
  }

  #closed (): void {
    if (--this.#openClients > 0) return
    this.#idleTimer = setTimeout(() => {
      this.#idleTimer = null
      const running = this.#running
      if (running === null) return
      // Detached at once: a client opened from here on starts a new worker.
      this.#running = null
      running.worker.postMessage({ type: 'exit' } satisfies ToWorker)
    }, this.#idleExitMs)
    this.#idleTimer.unref()
  }
}

/** The one worker of this process, shared by every AgentClient with `agent.worker`. */
export const agentThread = new AgentThread()
