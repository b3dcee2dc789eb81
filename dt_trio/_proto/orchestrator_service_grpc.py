import purerpc
from . import orchestrator_service_pb2 as orchestrator_service__pb2
import google.protobuf.timestamp_pb2 as google_dot_protobuf_dot_timestamp__pb2
import google.protobuf.duration_pb2 as google_dot_protobuf_dot_duration__pb2
import google.protobuf.wrappers_pb2 as google_dot_protobuf_dot_wrappers__pb2
import google.protobuf.empty_pb2 as google_dot_protobuf_dot_empty__pb2
import google.protobuf.struct_pb2 as google_dot_protobuf_dot_struct__pb2


class TaskHubSidecarServiceServicer(purerpc.Servicer):
    async def Hello(self, input_message):
        raise NotImplementedError()

    async def StartInstance(self, input_message):
        raise NotImplementedError()

    async def GetInstance(self, input_message):
        raise NotImplementedError()

    async def RewindInstance(self, input_message):
        raise NotImplementedError()

    async def RestartInstance(self, input_message):
        raise NotImplementedError()

    async def WaitForInstanceStart(self, input_message):
        raise NotImplementedError()

    async def WaitForInstanceCompletion(self, input_message):
        raise NotImplementedError()

    async def RaiseEvent(self, input_message):
        raise NotImplementedError()

    async def TerminateInstance(self, input_message):
        raise NotImplementedError()

    async def SuspendInstance(self, input_message):
        raise NotImplementedError()

    async def ResumeInstance(self, input_message):
        raise NotImplementedError()

    async def QueryInstances(self, input_message):
        raise NotImplementedError()

    async def ListInstanceIds(self, input_message):
        raise NotImplementedError()

    async def PurgeInstances(self, input_message):
        raise NotImplementedError()

    async def GetWorkItems(self, input_message):
        raise NotImplementedError()

    async def CompleteActivityTask(self, input_message):
        raise NotImplementedError()

    async def CompleteOrchestratorTask(self, input_message):
        raise NotImplementedError()

    async def CompleteEntityTask(self, input_message):
        raise NotImplementedError()

    async def StreamInstanceHistory(self, input_message):
        raise NotImplementedError()

    async def CreateTaskHub(self, input_message):
        raise NotImplementedError()

    async def DeleteTaskHub(self, input_message):
        raise NotImplementedError()

    async def SignalEntity(self, input_message):
        raise NotImplementedError()

    async def GetEntity(self, input_message):
        raise NotImplementedError()

    async def QueryEntities(self, input_message):
        raise NotImplementedError()

    async def CleanEntityStorage(self, input_message):
        raise NotImplementedError()

    async def AbandonTaskActivityWorkItem(self, input_message):
        raise NotImplementedError()

    async def AbandonTaskOrchestratorWorkItem(self, input_message):
        raise NotImplementedError()

    async def AbandonTaskEntityWorkItem(self, input_message):
        raise NotImplementedError()

    async def SkipGracefulOrchestrationTerminations(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "TaskHubSidecarService"
        )
        service_obj.add_method(
            "Hello",
            self.Hello,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        service_obj.add_method(
            "StartInstance",
            self.StartInstance,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.CreateInstanceRequest,
                orchestrator_service__pb2.CreateInstanceResponse,
            )
        )
        service_obj.add_method(
            "GetInstance",
            self.GetInstance,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.GetInstanceRequest,
                orchestrator_service__pb2.GetInstanceResponse,
            )
        )
        service_obj.add_method(
            "RewindInstance",
            self.RewindInstance,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.RewindInstanceRequest,
                orchestrator_service__pb2.RewindInstanceResponse,
            )
        )
        service_obj.add_method(
            "RestartInstance",
            self.RestartInstance,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.RestartInstanceRequest,
                orchestrator_service__pb2.RestartInstanceResponse,
            )
        )
        service_obj.add_method(
            "WaitForInstanceStart",
            self.WaitForInstanceStart,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.GetInstanceRequest,
                orchestrator_service__pb2.GetInstanceResponse,
            )
        )
        service_obj.add_method(
            "WaitForInstanceCompletion",
            self.WaitForInstanceCompletion,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.GetInstanceRequest,
                orchestrator_service__pb2.GetInstanceResponse,
            )
        )
        service_obj.add_method(
            "RaiseEvent",
            self.RaiseEvent,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.RaiseEventRequest,
                orchestrator_service__pb2.RaiseEventResponse,
            )
        )
        service_obj.add_method(
            "TerminateInstance",
            self.TerminateInstance,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.TerminateRequest,
                orchestrator_service__pb2.TerminateResponse,
            )
        )
        service_obj.add_method(
            "SuspendInstance",
            self.SuspendInstance,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.SuspendRequest,
                orchestrator_service__pb2.SuspendResponse,
            )
        )
        service_obj.add_method(
            "ResumeInstance",
            self.ResumeInstance,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.ResumeRequest,
                orchestrator_service__pb2.ResumeResponse,
            )
        )
        service_obj.add_method(
            "QueryInstances",
            self.QueryInstances,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.QueryInstancesRequest,
                orchestrator_service__pb2.QueryInstancesResponse,
            )
        )
        service_obj.add_method(
            "ListInstanceIds",
            self.ListInstanceIds,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.ListInstanceIdsRequest,
                orchestrator_service__pb2.ListInstanceIdsResponse,
            )
        )
        service_obj.add_method(
            "PurgeInstances",
            self.PurgeInstances,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.PurgeInstancesRequest,
                orchestrator_service__pb2.PurgeInstancesResponse,
            )
        )
        service_obj.add_method(
            "GetWorkItems",
            self.GetWorkItems,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                orchestrator_service__pb2.GetWorkItemsRequest,
                orchestrator_service__pb2.WorkItem,
            )
        )
        service_obj.add_method(
            "CompleteActivityTask",
            self.CompleteActivityTask,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.ActivityResponse,
                orchestrator_service__pb2.CompleteTaskResponse,
            )
        )
        service_obj.add_method(
            "CompleteOrchestratorTask",
            self.CompleteOrchestratorTask,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.OrchestratorResponse,
                orchestrator_service__pb2.CompleteTaskResponse,
            )
        )
        service_obj.add_method(
            "CompleteEntityTask",
            self.CompleteEntityTask,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.EntityBatchResult,
                orchestrator_service__pb2.CompleteTaskResponse,
            )
        )
        service_obj.add_method(
            "StreamInstanceHistory",
            self.StreamInstanceHistory,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                orchestrator_service__pb2.StreamInstanceHistoryRequest,
                orchestrator_service__pb2.HistoryChunk,
            )
        )
        service_obj.add_method(
            "CreateTaskHub",
            self.CreateTaskHub,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.CreateTaskHubRequest,
                orchestrator_service__pb2.CreateTaskHubResponse,
            )
        )
        service_obj.add_method(
            "DeleteTaskHub",
            self.DeleteTaskHub,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.DeleteTaskHubRequest,
                orchestrator_service__pb2.DeleteTaskHubResponse,
            )
        )
        service_obj.add_method(
            "SignalEntity",
            self.SignalEntity,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.SignalEntityRequest,
                orchestrator_service__pb2.SignalEntityResponse,
            )
        )
        service_obj.add_method(
            "GetEntity",
            self.GetEntity,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.GetEntityRequest,
                orchestrator_service__pb2.GetEntityResponse,
            )
        )
        service_obj.add_method(
            "QueryEntities",
            self.QueryEntities,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.QueryEntitiesRequest,
                orchestrator_service__pb2.QueryEntitiesResponse,
            )
        )
        service_obj.add_method(
            "CleanEntityStorage",
            self.CleanEntityStorage,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.CleanEntityStorageRequest,
                orchestrator_service__pb2.CleanEntityStorageResponse,
            )
        )
        service_obj.add_method(
            "AbandonTaskActivityWorkItem",
            self.AbandonTaskActivityWorkItem,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.AbandonActivityTaskRequest,
                orchestrator_service__pb2.AbandonActivityTaskResponse,
            )
        )
        service_obj.add_method(
            "AbandonTaskOrchestratorWorkItem",
            self.AbandonTaskOrchestratorWorkItem,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.AbandonOrchestrationTaskRequest,
                orchestrator_service__pb2.AbandonOrchestrationTaskResponse,
            )
        )
        service_obj.add_method(
            "AbandonTaskEntityWorkItem",
            self.AbandonTaskEntityWorkItem,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.AbandonEntityTaskRequest,
                orchestrator_service__pb2.AbandonEntityTaskResponse,
            )
        )
        service_obj.add_method(
            "SkipGracefulOrchestrationTerminations",
            self.SkipGracefulOrchestrationTerminations,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.SkipGracefulOrchestrationTerminationsRequest,
                orchestrator_service__pb2.SkipGracefulOrchestrationTerminationsResponse,
            )
        )
        return service_obj


class TaskHubSidecarServiceStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "TaskHubSidecarService",
            channel
        )
        self.Hello = self._client.get_method_stub(
            "Hello",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                google_dot_protobuf_dot_empty__pb2.Empty,
                google_dot_protobuf_dot_empty__pb2.Empty,
            )
        )
        self.StartInstance = self._client.get_method_stub(
            "StartInstance",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.CreateInstanceRequest,
                orchestrator_service__pb2.CreateInstanceResponse,
            )
        )
        self.GetInstance = self._client.get_method_stub(
            "GetInstance",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.GetInstanceRequest,
                orchestrator_service__pb2.GetInstanceResponse,
            )
        )
        self.RewindInstance = self._client.get_method_stub(
            "RewindInstance",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.RewindInstanceRequest,
                orchestrator_service__pb2.RewindInstanceResponse,
            )
        )
        self.RestartInstance = self._client.get_method_stub(
            "RestartInstance",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.RestartInstanceRequest,
                orchestrator_service__pb2.RestartInstanceResponse,
            )
        )
        self.WaitForInstanceStart = self._client.get_method_stub(
            "WaitForInstanceStart",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.GetInstanceRequest,
                orchestrator_service__pb2.GetInstanceResponse,
            )
        )
        self.WaitForInstanceCompletion = self._client.get_method_stub(
            "WaitForInstanceCompletion",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.GetInstanceRequest,
                orchestrator_service__pb2.GetInstanceResponse,
            )
        )
        self.RaiseEvent = self._client.get_method_stub(
            "RaiseEvent",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.RaiseEventRequest,
                orchestrator_service__pb2.RaiseEventResponse,
            )
        )
        self.TerminateInstance = self._client.get_method_stub(
            "TerminateInstance",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.TerminateRequest,
                orchestrator_service__pb2.TerminateResponse,
            )
        )
        self.SuspendInstance = self._client.get_method_stub(
            "SuspendInstance",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.SuspendRequest,
                orchestrator_service__pb2.SuspendResponse,
            )
        )
        self.ResumeInstance = self._client.get_method_stub(
            "ResumeInstance",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.ResumeRequest,
                orchestrator_service__pb2.ResumeResponse,
            )
        )
        self.QueryInstances = self._client.get_method_stub(
            "QueryInstances",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.QueryInstancesRequest,
                orchestrator_service__pb2.QueryInstancesResponse,
            )
        )
        self.ListInstanceIds = self._client.get_method_stub(
            "ListInstanceIds",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.ListInstanceIdsRequest,
                orchestrator_service__pb2.ListInstanceIdsResponse,
            )
        )
        self.PurgeInstances = self._client.get_method_stub(
            "PurgeInstances",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.PurgeInstancesRequest,
                orchestrator_service__pb2.PurgeInstancesResponse,
            )
        )
        self.GetWorkItems = self._client.get_method_stub(
            "GetWorkItems",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                orchestrator_service__pb2.GetWorkItemsRequest,
                orchestrator_service__pb2.WorkItem,
            )
        )
        self.CompleteActivityTask = self._client.get_method_stub(
            "CompleteActivityTask",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.ActivityResponse,
                orchestrator_service__pb2.CompleteTaskResponse,
            )
        )
        self.CompleteOrchestratorTask = self._client.get_method_stub(
            "CompleteOrchestratorTask",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.OrchestratorResponse,
                orchestrator_service__pb2.CompleteTaskResponse,
            )
        )
        self.CompleteEntityTask = self._client.get_method_stub(
            "CompleteEntityTask",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.EntityBatchResult,
                orchestrator_service__pb2.CompleteTaskResponse,
            )
        )
        self.StreamInstanceHistory = self._client.get_method_stub(
            "StreamInstanceHistory",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                orchestrator_service__pb2.StreamInstanceHistoryRequest,
                orchestrator_service__pb2.HistoryChunk,
            )
        )
        self.CreateTaskHub = self._client.get_method_stub(
            "CreateTaskHub",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.CreateTaskHubRequest,
                orchestrator_service__pb2.CreateTaskHubResponse,
            )
        )
        self.DeleteTaskHub = self._client.get_method_stub(
            "DeleteTaskHub",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.DeleteTaskHubRequest,
                orchestrator_service__pb2.DeleteTaskHubResponse,
            )
        )
        self.SignalEntity = self._client.get_method_stub(
            "SignalEntity",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.SignalEntityRequest,
                orchestrator_service__pb2.SignalEntityResponse,
            )
        )
        self.GetEntity = self._client.get_method_stub(
            "GetEntity",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.GetEntityRequest,
                orchestrator_service__pb2.GetEntityResponse,
            )
        )
        self.QueryEntities = self._client.get_method_stub(
            "QueryEntities",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.QueryEntitiesRequest,
                orchestrator_service__pb2.QueryEntitiesResponse,
            )
        )
        self.CleanEntityStorage = self._client.get_method_stub(
            "CleanEntityStorage",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.CleanEntityStorageRequest,
                orchestrator_service__pb2.CleanEntityStorageResponse,
            )
        )
        self.AbandonTaskActivityWorkItem = self._client.get_method_stub(
            "AbandonTaskActivityWorkItem",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.AbandonActivityTaskRequest,
                orchestrator_service__pb2.AbandonActivityTaskResponse,
            )
        )
        self.AbandonTaskOrchestratorWorkItem = self._client.get_method_stub(
            "AbandonTaskOrchestratorWorkItem",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.AbandonOrchestrationTaskRequest,
                orchestrator_service__pb2.AbandonOrchestrationTaskResponse,
            )
        )
        self.AbandonTaskEntityWorkItem = self._client.get_method_stub(
            "AbandonTaskEntityWorkItem",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.AbandonEntityTaskRequest,
                orchestrator_service__pb2.AbandonEntityTaskResponse,
            )
        )
        self.SkipGracefulOrchestrationTerminations = self._client.get_method_stub(
            "SkipGracefulOrchestrationTerminations",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                orchestrator_service__pb2.SkipGracefulOrchestrationTerminationsRequest,
                orchestrator_service__pb2.SkipGracefulOrchestrationTerminationsResponse,
            )
        )