// Every AgentClient test again, with the agent traffic on the agent worker thread (option
// `agent.worker`): the same requests, answers, errors, causes, timeouts and aborts.
import './helpers/agent-client-on-worker'
import './agent-client.test'
