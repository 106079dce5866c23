//! `runnel.v1.Admin`.

use std::sync::Arc;

use runnel_proto::v1 as pb;
use runnel_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::security;
use runnel_controller::security::{Operation, ResourceType};

/// Serves topic and cluster administration.
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    /// Wraps a broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let name = request.get_ref().name.clone();
        super::refuse_internal(&name, "create")?;
        if !security::allowed(
            &self.broker,
            &request,
            ResourceType::Cluster,
            "",
            Operation::Create,
        ) {
            security::check(
                &self.broker,
                &request,
                ResourceType::Topic,
                &name,
                Operation::Create,
            )?;
        }
        let topic = self.broker.create_topic(request.into_inner()).await?;
        Ok(Response::new(pb::CreateTopicResponse {
            topic: Some(topic),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let name = request.get_ref().name.clone();
        super::refuse_internal(&name, "delete")?;
        security::check(
            &self.broker,
            &request,
            ResourceType::Topic,
            &name,
            Operation::Delete,
        )?;
        self.broker.delete_topic(&request.into_inner().name).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let mut list = self.broker.list_topics(request.get_ref().include_internal);
        list.topics.retain(|t| {
            security::allowed(
                &self.broker,
                &request,
                ResourceType::Topic,
                &t.name,
                Operation::Describe,
            )
        });
        Ok(Response::new(list))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::TopicDescription>, Status> {
        let name = request.get_ref().name.clone();
        security::check(
            &self.broker,
            &request,
            ResourceType::Topic,
            &name,
            Operation::Describe,
        )?;
        Ok(Response::new(
            self.broker
                .describe_topic_live(&request.into_inner().name)
                .await?,
        ))
    }

    async fn delete_records(
        &self,
        request: Request<pb::DeleteRecordsRequest>,
    ) -> Result<Response<pb::DeleteRecordsResponse>, Status> {
        let topic = request.get_ref().topic.clone();
        super::refuse_internal(&topic, "delete records of")?;
        security::check(
            &self.broker,
            &request,
            ResourceType::Topic,
            &topic,
            Operation::Delete,
        )?;
        Ok(Response::new(
            self.broker.delete_records(request.into_inner()).await?,
        ))
    }

    async fn add_partitions(
        &self,
        request: Request<pb::AddPartitionsRequest>,
    ) -> Result<Response<pb::TopicDescription>, Status> {
        let name = request.get_ref().name.clone();
        super::refuse_internal(&name, "add partitions to")?;
        security::check(
            &self.broker,
            &request,
            ResourceType::Topic,
            &name,
            Operation::Alter,
        )?;
        let req = request.into_inner();
        Ok(Response::new(
            self.broker
                .add_partitions(&req.name, req.total_partitions)
                .await?,
        ))
    }

    async fn alter_topic_config(
        &self,
        request: Request<pb::AlterTopicConfigRequest>,
    ) -> Result<Response<pb::TopicDescription>, Status> {
        let name = request.get_ref().name.clone();
        let req = request.get_ref();
        // Of the offsets topic, what its commits' safety rests on:
        // retention would delete committed offsets (as deleting records
        // would), a smaller max.message.bytes refuses large groups'
        // records, and min.insync.replicas and unclean election decide
        // whether an acknowledged commit survives a broker's loss.
        const KEPT: [&str; 5] = [
            "retention.ms",
            "retention.bytes",
            "max.message.bytes",
            "min.insync.replicas",
            "unclean.leader.election.enable",
        ];
        let kept = |k: &str| KEPT.contains(&k);
        if req.set.keys().any(|k| kept(k)) || req.delete.iter().any(|k| kept(k)) {
            super::refuse_internal(
                &name,
                "change retention, max.message.bytes, min.insync.replicas or unclean election of",
            )?;
        }
        security::check(
            &self.broker,
            &request,
            ResourceType::Topic,
            &name,
            Operation::Alter,
        )?;
        Ok(Response::new(
            self.broker.alter_topic_config(request.into_inner()).await?,
        ))
    }

    async fn describe_cluster(
        &self,
        request: Request<pb::DescribeClusterRequest>,
    ) -> Result<Response<pb::ClusterDescription>, Status> {
        security::check_cluster(&self.broker, &request, Operation::Describe)?;
        Ok(Response::new(self.broker.describe_cluster()))
    }

    async fn elect_leaders(
        &self,
        request: Request<pb::ElectLeadersRequest>,
    ) -> Result<Response<pb::ElectLeadersResponse>, Status> {
        security::check_cluster(&self.broker, &request, Operation::Alter)?;
        Ok(Response::new(
            self.broker.elect_leaders(request.into_inner()).await?,
        ))
    }

    async fn reassign_partitions(
        &self,
        request: Request<pb::ReassignPartitionsRequest>,
    ) -> Result<Response<pb::TopicDescription>, Status> {
        security::check_cluster(&self.broker, &request, Operation::Alter)?;
        Ok(Response::new(
            self.broker
                .reassign_partitions(request.into_inner())
                .await?,
        ))
    }

    async fn metadata(
        &self,
        request: Request<pb::MetadataRequest>,
    ) -> Result<Response<pb::MetadataResponse>, Status> {
        // A named topic the caller may not describe is refused whether
        // or not it exists (Kafka's TOPIC_AUTHORIZATION_FAILED): leaving
        // it out while a missing name was UNKNOWN_TOPIC told which names
        // exist.
        for name in &request.get_ref().topics {
            security::check(
                &self.broker,
                &request,
                ResourceType::Topic,
                name,
                Operation::Describe,
            )?;
        }
        let mut response = self.broker.cluster_metadata(&request.get_ref().topics)?;
        // Topics the caller may not describe are left out (all topics
        // were asked for).
        response.topics.retain(|t| {
            security::allowed(
                &self.broker,
                &request,
                ResourceType::Topic,
                &t.name,
                Operation::Describe,
            )
        });
        Ok(Response::new(response))
    }
}
